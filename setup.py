"""Builds casa_kernels._C: the fused CPU kernel and, where CUDA is available, the CUDA one.

* CPU sources always build; CUDA sources (csrc/cuda) build when torch has CUDA and
  nvcc is found, or when FORCE_CUDA=1. Otherwise the build says it skips them.
* MAX_JOBS bounds ninja's parallel jobs; TORCH_CUDA_ARCH_LIST picks the GPU
  architectures (default "8.0;9.0+PTX").
* The CUDA kernels need the CUTLASS/CuTe headers: ``$CUTLASS_PATH`` (a CUTLASS checkout
  or its include/ directory) or the ``nvidia-cutlass`` wheel (the ``cuda`` extra, or
  ``pip install --no-deps nvidia-cutlass==4.2.0.0``), found by
  casa_kernels/cutlass_headers.py; a CUDA build without them fails saying why.
* Build without isolation so the extension matches the installed torch:
  ``pip install --no-build-isolation -e .``
"""

import glob
import os
import runpy

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _relative(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = _relative("csrc/*.cpp") + _relative("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without the flag
    # it compiles to a serial loop.
    # -fno-trapping-math: nothing here reads floating-point exception flags; without it
    # GCC keeps the comparisons of the vectorised loops (csrc/cpu/vectorised.cpp) as branches
    # on AVX2, where only AVX-512's masks let it vectorise them. Values are unchanged.
    # The C++ standard is left to torch's BuildExtension (C++17 or C++20 by release).
    cxx_flags = ["-O3", "-fno-trapping-math", "-fopenmp", "-DCASA_PYTHON_MODULE"]
    link_flags = ["-fopenmp"]
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    cuda_sources = _relative("csrc/cuda/*.cpp") + _relative("csrc/cuda/*.cu")
    if with_cuda and cuda_sources:
        # Run by path: the package (and its torch-side modules) need not import mid-build.
        cutlass_headers = runpy.run_path(os.path.join(ROOT, "casa_kernels", "cutlass_headers.py"))
        cutlass, how = cutlass_headers["find_include"]()
        if cutlass is None:
            raise SystemExit(
                f"casa_kernels: the CUDA kernels need the CUTLASS/CuTe headers: {how} "
                "(the nvidia-cutlass wheel is also the package's `cuda` extra)"
            )
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        return [
            CUDAExtension(
                "casa_kernels._C",
                sources + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc"), cutlass],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=link_flags,
            )
        ]
    print(
        "casa_kernels: building the CPU kernel only "
        f"(torch CUDA: {torch.version.cuda}, CUDA_HOME: {CUDA_HOME}; set FORCE_CUDA=1 to force)"
    )
    return [
        CppExtension(
            "casa_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
