"""Builds torch_safebn._C: the C++ (CPU) kernels always, the CUDA kernels
whenever this torch is a CUDA build and nvcc exists (no GPU is needed).

An extension runs only with the torch it was compiled against, so everything
here comes from the torch that builds (in an isolated build, the one pinned in
pyproject.toml's build-system.requires): the include paths, the default CUDA
architectures, the wheel's torch requirement, and _build_info.py, which the
package checks at import."""
import glob
import os
import re
import subprocess

from setuptools import find_packages, setup

# torch resolves CUDA_HOME when cpp_extension is imported; without it, it
# guesses /usr/local and the link fails.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402
except ModuleNotFoundError:
    raise SystemExit("torch_safebn is compiled against the torch it will run with, and this environment has "
                     "none: install torch first, or build without --no-build-isolation (pip then builds "
                     "against the torch pyproject.toml names and installs it)") from None
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _cuda_build_possible():
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_include_dirs():
    """The CUDA library headers torch includes (cusparse.h, cublas_v2.h) come
    with torch's pip dependencies rather than with nvcc, installed beside torch:
    nvidia/cu13/include (CUDA 13), nvidia/cusparse/include and so on (CUDA 12).
    In an isolated build that is pip's build environment, not the target's."""
    return sorted(glob.glob(os.path.join(os.path.dirname(TORCH_DIR), "nvidia", "cu*", "include")))


def _default_cuda_arch_list():
    """Where no GPU is visible: the architectures this torch was built for
    (sm_75 to sm_120 for CUDA 13.0), and PTX of the newest, which the driver
    compiles for GPUs newer than all of them. A visible GPU is left to torch,
    which builds for that GPU only."""
    # "sm_75 sm_90a sm_100 compute_120" -> 7.5, 9.0a, 10.0 (compute_*: PTX)
    arches = [f"{major}.{minor}{suffix}" for major, minor, suffix
              in re.findall(r"\bsm_(\d+)(\d)([a-z]?)\b", torch._C._cuda_getArchFlags())]
    if not arches:
        raise RuntimeError("this torch names no CUDA architecture: set TORCH_CUDA_ARCH_LIST, e.g. to '9.0'")
    return ";".join(arches) + "+PTX"


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
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp", "csrc/checks.cpp", "csrc/layout.cpp", "csrc/guard_args.cpp",
               "csrc/composite.cpp", "csrc/autograd.cpp", "csrc/sync.cpp", "csrc/cpu/kernels.cpp", "csrc/cpu/batch_norm_cpu.cpp"]
    # csrc/ and the contract the C++ code shares with the Python layer
    include_dirs = [os.path.join(HERE, "csrc"), os.path.join(HERE, "torch_safebn")]
    # setuptools rebuilds _C only when a file it compares against it is newer:
    # torch's version (a new torch in the same environment), the contract, and
    # csrc's headers, none of which are among the sources.
    depends = [os.path.join(TORCH_DIR, "version.py"), os.path.join(HERE, "torch_safebn", "contract.def"),
               os.path.join(HERE, "torch_safebn", "ops.def"),
               *sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*.h"), recursive=True)),
               *sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*.cuh"), recursive=True))]
    if not _cuda_build_possible():
        return cpp_extension.CppExtension(
            "torch_safebn._C", sources, include_dirs=include_dirs, depends=depends,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags, py_limited_api=False)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_arch_list()
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo",
                  # register and spill counts per kernel, kept in the build log
                  "-Xptxas", "-v"]
    return cpp_extension.CUDAExtension(
        "torch_safebn._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + _cuda_include_dirs(), depends=depends,
        define_macros=[("SAFEBN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)


def _source_commit():
    """The checkout's commit, with "+changes" where its compiled sources differ
    from it; None outside a git checkout of this project (an sdist)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(HERE):
            return None  # an sdist unpacked inside another checkout
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "csrc", "setup.py", "torch_safebn/contract.def",
                      "torch_safebn/ops.def")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, which also writes _build_info.py beside _C: the
    torch it was built for (see torch_safebn/_extension.py), and the commit of
    the sources, which benchmark results record."""

    def build_extension(self, ext):
        super().build_extension(ext)
        # into build_lib: setuptools builds there even for --inplace, and
        # copies to the source tree afterwards (below)
        self._write_build_info(ext)

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for ext in self.extensions:
            self._write_build_info(ext)  # self.inplace is set: beside the copied _C

    def _write_build_info(self, ext):
        path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py")
        with open(path, "w") as f:
            f.write('"""Written by setup.py when it built _C beside this file."""\n'
                    f"TORCH_VERSION = {str(torch.__version__)!r}\n"
                    f"SOURCE_COMMIT = {_source_commit()!r}\n")


setup(
    packages=find_packages(include=["torch_safebn", "torch_safebn.*"]),
    # The torch that built _C, by its public version (2.14.1 for 2.14.1+cu130):
    # pip then keeps the torch the extension was built for.
    install_requires=[f"torch=={torch.__version__.split('+')[0]}"],
    # The Makefile registers the package once with SAFEBN_NO_EXTENSION=1 and
    # builds the extension with `build_ext --inplace`, which ninja keeps
    # incremental; a plain `pip install` builds it here.
    ext_modules=[] if os.environ.get("SAFEBN_NO_EXTENSION") else [_extension()],
    cmdclass={"build_ext": BuildExtension},
)
