// The counters' snapshot behind CUDA's lagged raise (torch_safebn/safety.py):
// a raw asynchronous copy of a module's counters into its pinned host buffer
// on the current stream, taken after every guarded call. Tensor.copy_ would
// cost a dispatcher call and a copy kernel's setup each time.
#include "snapshot.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

namespace safebn {
namespace cuda {

PyObject* snapshot_counters(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 2 && THPVariable_Check(args[0]) && THPVariable_Check(args[1]),
              "snapshot_counters(counters, host) takes a CUDA tensor and a pinned CPU tensor");
  const at::Tensor& counters = THPVariable_Unpack(args[0]);
  const at::Tensor& host = THPVariable_Unpack(args[1]);
  TORCH_CHECK(counters.is_cuda() && counters.is_contiguous() && host.device().is_cpu() && host.is_contiguous() &&
                  host.nbytes() == counters.nbytes(),
              "snapshot_counters: the host buffer must be a contiguous CPU tensor of the counters' size");
  C10_CUDA_CHECK(cudaMemcpyAsync(host.mutable_data_ptr(), counters.const_data_ptr(), counters.nbytes(),
                                 cudaMemcpyDeviceToHost, c10::cuda::getCurrentCUDAStream(counters.device().index())));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace cuda
}  // namespace safebn
