"""Where the CUTLASS/CuTe headers of the CUDA kernels are: the one lookup for the build
(setup.py, CMakeLists.txt), .ci/compile_cuda.sh, the device check's preflight
(bench/device_check.py) and the CUDA emulation tests.

Standard library only: the build and the preflight run this file by its path, where
torch or the package may not import; ``python casa_kernels/cutlass_headers.py`` prints
the include folder, or says why there is none and exits 1.
"""

from __future__ import annotations

import os

CUTLASS_VERSION = "4.2.0.0"
INSTALL_HINT = f"pip install --no-deps nvidia-cutlass=={CUTLASS_VERSION}"


def has_cute(include: str) -> bool:
    """Whether ``include`` holds CuTe (``cute/tensor.hpp``)."""
    return os.path.isfile(os.path.join(include, "cute", "tensor.hpp"))


def find_include() -> tuple[str | None, str]:
    """``(include folder, how it was found)``, or ``(None, why not)``.

    ``$CUTLASS_PATH`` (a CUTLASS checkout or its include/ folder) where set, and then
    nothing else: a setting that names no headers is reported, not passed over. Else the
    installed ``nvidia-cutlass`` wheel's copy (``cutlass_library/source/include``).
    """
    root = os.environ.get("CUTLASS_PATH")
    if root:
        for include in (os.path.join(root, "include"), root):
            if has_cute(include):
                return include, f"CUTLASS_PATH: {include}"
        return None, f"CUTLASS_PATH={root} holds no cute/tensor.hpp (nor does its include/)"
    try:
        import cutlass_library
    except ImportError:
        return None, f"not found: set CUTLASS_PATH to a CUTLASS checkout, or `{INSTALL_HINT}`"
    include = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    if has_cute(include):
        return include, f"the installed nvidia-cutlass wheel: {include}"
    return None, f"the installed nvidia-cutlass wheel has no {include}/cute/tensor.hpp"


if __name__ == "__main__":  # for shell scripts and CMake: the folder, or why not and exit 1
    import sys

    found, reason = find_include()
    if found is None:
        sys.exit(f"CUTLASS/CuTe headers: {reason}")
    print(found)
