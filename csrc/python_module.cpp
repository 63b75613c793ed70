// The Python module torch_safebn._C: importing it loads this library, which
// registers the ops. Its functions are the two reads of a module's counters
// that every guarded call makes and the totals of every synchronized batch,
// written here because a Tensor method or a dispatcher call would cost more
// than a small batch's kernels, and the read of the group statistics that
// SafeSyncBatchNorm's eager forward keeps in C++.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/utils/wrap_outputs.h>

#ifdef SAFEBN_WITH_CUDA
#include <ATen/core/CachingHostAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "contract.h"
#include "cpu/kernels.h"
#include "group_batch.h"
#include "sync.h"

namespace safebn {
namespace {

const at::Tensor& counters_argument(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t expected, const char* usage) {
  TORCH_CHECK(nargs == expected && THPVariable_Check(args[0]), usage);
  const at::Tensor& counters = THPVariable_Unpack(args[0]);
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.numel() == kNumCounters && counters.is_contiguous(),
              usage, ": counters must be a module's safety_counters");
  return counters;
}

// events_pending(counters) -> bool, for CPU counters: whether they count a
// non-finite event the host has not reported.
PyObject* events_pending(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const at::Tensor& counters = counters_argument(args, nargs, 1, "events_pending(counters) takes CPU counters");
  TORCH_CHECK(counters.device().is_cpu(), "events_pending(counters) takes CPU counters");
  const int64_t* values = counters.const_data_ptr<int64_t>();
  return PyBool_FromLong(values[kNonfiniteEvents] != values[kReportedEvents]);
  END_HANDLE_TH_ERRORS
}

#ifdef SAFEBN_WITH_CUDA
// snapshot_counters(counters, host): an asynchronous copy of CUDA counters
// into their module's pinned host buffer on the current stream, the snapshot
// behind CUDA's lagged raise (torch_safebn/safety.py).
PyObject* snapshot_counters(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* usage = "snapshot_counters(counters, host) takes CUDA counters and a pinned CPU tensor";
  const at::Tensor& counters = counters_argument(args, nargs, 2, usage);
  TORCH_CHECK(counters.is_cuda() && THPVariable_Check(args[1]), usage);
  const at::Tensor& host = THPVariable_Unpack(args[1]);
  TORCH_CHECK(host.device().is_cpu() && host.is_contiguous() && host.nbytes() == counters.nbytes(), usage);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(counters.device().index());
  C10_CUDA_CHECK(cudaMemcpyAsync(host.mutable_data_ptr(), counters.const_data_ptr(), counters.nbytes(),
                                 cudaMemcpyDeviceToHost, stream));
  // The pinned buffer is in use until the copy lands: recorded with torch's
  // caching host allocator, as Tensor.copy_(non_blocking=True) records it, so
  // that a module freed before then does not hand it to another pinned
  // tensor (a DataLoader's batch) while the copy is in flight.
  TORCH_CHECK(at::getHostAllocator(at::kCUDA)->record_event(host.mutable_data_ptr(),
                                                            host.storage().data_ptr().get_context(), stream.unwrap()),
              usage, ": the host buffer must come from torch's pinned-memory allocator (pin_memory=True)");
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}
#endif

// group_statistics(group_name, module) -> (mean, invstd, group_batch): what the
// module's latest eager synchronized forward over the group gathered.
PyObject* group_statistics(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* usage = "group_statistics(group_name: str, module: int)";
  TORCH_CHECK(nargs == 2 && PyUnicode_Check(args[0]) && PyLong_Check(args[1]), usage);
  Py_ssize_t length = 0;
  const char* group = PyUnicode_AsUTF8AndSize(args[0], &length);
  const int64_t module = PyLong_AsLongLong(args[1]);
  if (group == nullptr || PyErr_Occurred()) return nullptr;
  const auto statistics = latest_group_statistics(c10::string_view(group, length), module);
  TORCH_CHECK(statistics.has_value(), "SafeSyncBatchNorm #", module, " has made no synchronized forward over the "
              "process group ", group, " in this process");
  return torch::autograd::utils::wrap(*statistics);
  END_HANDLE_TH_ERRORS
}

// group_totals(group_batch) -> (count, examples, finite): what the host
// decides from a synchronized batch, read as the ops read it, at every
// synchronized forward (Tensor.tolist() and a Python loop would cost more).
PyObject* group_totals(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 1 && THPVariable_Check(args[0]), "group_totals(group_batch: Tensor)");
  const GroupTotals group = totals(THPVariable_Unpack(args[0]));
  return Py_BuildValue("(LLO)", static_cast<long long>(group.count), static_cast<long long>(group.examples),
                       group.finite ? Py_True : Py_False);
  END_HANDLE_TH_ERRORS
}

// kernel_isa() -> str: the instruction set of the CPU kernels this processor runs.
PyObject* kernel_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cpu::kernel_isa()); }

template <auto function>
PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(function));
}

PyMethodDef methods[] = {
    {"kernel_isa", kernel_isa, METH_NOARGS, "The instruction set of the CPU kernels this processor runs."},
    {"events_pending", fastcall<&events_pending>(), METH_FASTCALL,
     "Whether CPU counters count a non-finite event the host has not reported."},
    {"group_totals", fastcall<&group_totals>(), METH_FASTCALL,
     "Values per channel, examples and whether the statistics were finite over a synchronized batch."},
    {"group_statistics", fastcall<&group_statistics>(), METH_FASTCALL,
     "The group statistics of a SafeSyncBatchNorm's latest eager synchronized forward."},
#ifdef SAFEBN_WITH_CUDA
    {"snapshot_counters", fastcall<&snapshot_counters>(), METH_FASTCALL,
     "Copies CUDA counters into their module's pinned host buffer, asynchronously."},
#endif
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace safebn

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, safebn::methods};
  return PyModule_Create(&module);
}
