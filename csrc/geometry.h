// How a batch-norm input is walked: N x C x S with either the spatial (S)
// axis or the channel (C) axis innermost. Plain C++, shared by every kernel.
#pragma once

#include <cstdint>

namespace safebn {

struct Geometry {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 1;   // S: product of the dimensions after C
  // false: element (n, c, s) at (n * C + c) * S + s  (contiguous NCHW, NCL, NC)
  // true:  element (n, c, s) at (n * S + s) * C + c  (channels_last, channels_last_3d)
  bool channels_last = false;

  int64_t per_channel() const { return batch * spatial; }
  int64_t rows() const { return batch * spatial; }  // channels-last rows of C values
};

}  // namespace safebn
