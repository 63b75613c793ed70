// The operator schemas of namespace safebn, expanded from the contract
// (torch_safebn/ops.def, which documents each op). Device kernels
// register in cpu/ and cuda/, the autograd of the forwards in autograd.cpp,
// the ops written in ATen ops in composite.cpp; the fake kernels, the
// fallback and the host's observe kernel in torch_safebn/_ops.py.
#include <torch/library.h>

// flexible_layout: the kernels take any strides and give the input's memory
// format back (as the fake kernels say), so inductor need not copy an input to
// the strides eager code would have had. Without it, a compiled convnet whose
// convolutions inductor runs channels-last paid four copies of the activation
// per batch norm, two each way.
TORCH_LIBRARY(safebn, m) {
#define SAFEBN_OP(name, schema) m.def(#name schema, {at::Tag::flexible_layout});
#include "ops.def"
#undef SAFEBN_OP
}
