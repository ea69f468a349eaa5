"""Builds fastattn._C: CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA torch exist.

    pip install --no-build-isolation -e .
Env: FASTATTN_BUILD_CUDA=0/1 forces the CUDA build off/on; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "8.0;9.0a"); CUDA_HOME must name the toolkit directory; MAX_JOBS caps ninja;
FASTATTN_CXXFLAGS: more flags for the C++ (not the nvcc) compiles, after the defaults (so
"-O0 -g0" overrides -O3 and Python's -g: tools/check_cuda.sh, whose build only has to link);
FASTATTN_NVCC_VERBOSE=1: ptxas's resource usage per kernel in the build log (-Xptxas -v: checked
by tools/ptxas_report.py in tools/check_cuda.sh).
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

VERSION = open("fastattn/_version.py").read().split('"')[1]
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
flag = os.environ.get("FASTATTN_BUILD_CUDA")
with_cuda = flag == "1" if flag is not None else bool(torch.version.cuda and CUDA_HOME)

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
macros = [("FASTATTN_VERSION", f'"{VERSION}"')]
nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
if os.environ.get("FASTATTN_NVCC_VERBOSE") == "1":
    nvcc += ["-Xptxas", "-v"]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    macros += [("FASTATTN_WITH_CUDA", None), ("FASTATTN_CUDA_ARCHS", f'"{archs}"')]
Extension = CUDAExtension if with_cuda else CppExtension
cxx_extra = os.environ.get("FASTATTN_CXXFLAGS", "").split()


# torch's builder names each object after its source's stem (csrc/cuda/x.cpp and x.cu would both
# become x.o, one overwriting the other), so no two sources in a directory may share a stem: the
# CUDA ops pair <op>.cu (kernels) with <op>_host.cpp (checks, registration).
stems = [os.path.splitext(src)[0] for src in sources]
clash = sorted({stem for stem in stems if stems.count(stem) > 1})
if clash:
    raise SystemExit(f"setup.py: sources that would compile to one object: {clash}")


setup(
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=[
        Extension(
            "fastattn._C",
            sources,
            define_macros=macros,
            # No -march: vector paths use per-function target attributes and are picked at run time.
            extra_compile_args={"cxx": ["-O3", "-fopenmp", *cxx_extra], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
