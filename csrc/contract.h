// The contract shared with the Python layer (torch_safebn/contract.def),
// expanded: the counters' slots and the activations' codes as enums. ops.cpp
// expands the schemas (torch_safebn/ops.def).
#pragma once

#include <cstdint>

namespace safebn {

// Slots of a module's int64 counters tensor.
enum Counter : int64_t {
#define SAFEBN_COUNTER(name, meaning) k##name,
#define SAFEBN_ACTIVATION(name, text)
#include "contract.def"
#undef SAFEBN_COUNTER
#undef SAFEBN_ACTIVATION
  kNumCounters
};

// Codes of the ops' `activation` argument; each names its struct in activation.h.
enum class Activation : int64_t {
#define SAFEBN_COUNTER(name, meaning)
#define SAFEBN_ACTIVATION(name, text) k##name,
#include "contract.def"
#undef SAFEBN_COUNTER
#undef SAFEBN_ACTIVATION
  kCount
};

}  // namespace safebn
