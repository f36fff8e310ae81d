"""Build fastbn._C: CPU kernels always, CUDA kernels when the CUDA toolkit and a CUDA build
of torch are present (FASTBN_CUDA=0/1 overrides). No GPU is needed to build. TORCH_CUDA_ARCH_LIST
picks the architectures (default sm_80 and sm_90 plus PTX); FASTBN_NVCC_FLAGS adds nvcc flags
(e.g. "-Xptxas -v" for the per-kernel register and spill report).

Install with `pip install --no-build-isolation .` (or `-e .`) after torch is installed, so pip
does not pull a second torch into an isolated build environment.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    env = os.environ.get("FASTBN_CUDA")
    if env is not None:
        return env.strip() == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# -fno-tree-loop-distribute-patterns: short copy loops in the CPU kernels (a plane's few values)
# stay inline instead of becoming memmove calls.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-tree-loop-distribute-patterns", "-Wall",
             "-Wno-unknown-pragmas"]
srcs = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/checks.cpp", "csrc/module.cpp", "csrc/plan_binding.cpp"] + sources("csrc/cpu/*.cpp")
ext_kwargs = dict(
    name="fastbn._C",
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_link_args=["-fopenmp"],
)

if want_cuda():
    # Default architectures: Ampere and Hopper (plus PTX for newer GPUs), unless the user says.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    srcs += sources("csrc/cuda/*.cu") + sources("csrc/cuda/*_binding.cpp")
    ext = CUDAExtension(
        sources=srcs,
        define_macros=[("FASTBN_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + os.environ.get("FASTBN_NVCC_FLAGS", "").split(),
        },
        **ext_kwargs,
    )
else:
    ext = CppExtension(sources=srcs, extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)

setup(
    name="fastbn",
    version="0.1.0",
    description="Drop-in BatchNorm1d/2d/3d for PyTorch on hand-written CPU and CUDA kernels",
    packages=find_packages(include=["fastbn", "fastbn.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
)
