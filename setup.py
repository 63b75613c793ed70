"""Builds torch_safebn._C: the C++ (CPU) kernels always, the CUDA kernels
whenever this torch is a CUDA build and nvcc exists (no GPU is needed)."""
import glob
import os
import sysconfig

from setuptools import find_packages, setup

# torch resolves CUDA_HOME when cpp_extension is imported; without it, it
# guesses /usr/local and the link fails.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_possible():
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_include_dirs():
    """The CUDA library headers torch includes (cusparse.h, cublas_v2.h) come
    with torch's pip dependencies rather than with nvcc."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def _extension():
    # at::parallel_for is OpenMP inlined into our code: without -fopenmp the
    # kernels run on one thread. libgomp resolves to the one torch loaded.
    # For the CPU kernels' loops to vectorize: -fno-trapping-math, since the
    # fused activations' selects (exp's clamp) are branch-free only where a
    # compare may not trap (nothing here enables floating-point traps); and
    # more run-time alias checks than GCC's default 10, which the input
    # gradient with an activation (dy, x, dx and five per-lane arrays) needs.
    cxx_flags = ["-O3", "-Wall", "-Wno-unused-function", "-fopenmp", "-fno-trapping-math",
                 "--param=vect-max-version-for-alias-checks=32"]
    link_flags = ["-fopenmp"]
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp", "csrc/checks.cpp", "csrc/autograd.cpp",
               "csrc/cpu/kernels.cpp", "csrc/cpu/batch_norm_cpu.cpp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if not _cuda_build_possible():
        return cpp_extension.CppExtension(
            "torch_safebn._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags, py_limited_api=False)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo",
                  # register and spill counts per kernel, kept in the build log
                  "-Xptxas", "-v"]
    return cpp_extension.CUDAExtension(
        "torch_safebn._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + _cuda_include_dirs(),
        define_macros=[("SAFEBN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)


setup(
    name="torch_safebn",
    packages=find_packages(include=["torch_safebn", "torch_safebn.*"]),
    # The Makefile registers the package once with SAFEBN_NO_EXTENSION=1 and
    # builds the extension with `build_ext --inplace`, which ninja keeps
    # incremental; a plain `pip install` builds it here.
    ext_modules=[] if os.environ.get("SAFEBN_NO_EXTENSION") else [_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
