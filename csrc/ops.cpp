// The operator schemas of namespace safebn, expanded from the contract
// (torch_safebn/ops.def, which documents each op). Device kernels
// register in cpu/ and cuda/, the autograd of the forwards in autograd.cpp,
// the ops written in ATen ops in composite.cpp; the fake kernels, the
// fallback and the host's observe kernel in torch_safebn/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(safebn, m) {
#define SAFEBN_OP(name, schema) m.def(#name schema);
#include "ops.def"
#undef SAFEBN_OP
}
