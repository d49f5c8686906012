"""Build of tvr-kernels and its C++ extension ``tvr_kernels._C``.

Always ``pip install --no-build-isolation -e .`` (or ``make``): with build isolation pip would
install the newest torch, with several GB of CUDA packages, just to build against it.

* torch without CUDA (or ``TVR_KERNELS_CUDA=0``): a ``CppExtension`` of ``csrc/cpu/*.cpp``.
* torch with CUDA and nvcc found (or ``TORCH_CUDA_ARCH_LIST`` set): a ``CUDAExtension`` that
  adds ``csrc/cuda/*.cu`` and ``csrc/cuda/bindings.cpp``.
* ``TVR_KERNELS_NO_EXT=1``: no extension at all (pure Python; ops fall back to the reference).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("TVR_KERNELS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/module.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    want_cuda = (
        os.environ.get("TVR_KERNELS_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and (CUDA_HOME is not None or os.environ.get("TORCH_CUDA_ARCH_LIST"))
    )
    if want_cuda:
        ext = CUDAExtension(
            "tvr_kernels._C",
            cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/bindings.cpp"],
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("tvr_kernels._C", cpu_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="tvr-kernels",
    packages=find_packages(include=["tvr_kernels*", "tvr_models*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
