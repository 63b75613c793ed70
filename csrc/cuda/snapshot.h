// The Python functions of torch_safebn._C (CUDA builds): see snapshot.cpp.
#pragma once

#include <Python.h>

namespace safebn {
namespace cuda {

// snapshot_counters(counters, host): the raw copy, METH_FASTCALL.
PyObject* snapshot_counters(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace cuda
}  // namespace safebn
