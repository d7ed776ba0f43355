#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu with nvcc for sm_80, sm_86 and sm_90a, warnings as
# errors (docs/design.md §7). Needs no GPU and no torch: the .cu files are torch-free.
# The kernels use CUTLASS/CuTe headers: from $CUTLASS_PATH (a CUTLASS checkout, or its
# include/ directory) or from the nvidia-cutlass wheel
# (pip install --no-deps nvidia-cutlass==4.2.0.0), found by casa_kernels/cutlass_headers.py
# run with `$PYTHON` (default python3).
# Objects go to a temporary directory that is removed on exit. Exits non-zero on the
# first failure, or when nvcc or the sources are missing.
#   NVCC=/path/to/nvcc bash .ci/compile_cuda.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  else
    for candidate in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
      if [[ -x "$candidate" ]]; then nvcc="$candidate"; break; fi
    done
  fi
fi
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
  echo "compile_cuda: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)" >&2
  exit 2
fi

if ! cutlass="$("${PYTHON:-python3}" "$root/casa_kernels/cutlass_headers.py")"; then
  echo "compile_cuda: the CUTLASS/CuTe headers are needed (see above)" >&2
  exit 2
fi

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "compile_cuda: no csrc/cuda/*.cu sources found" >&2
  exit 2
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# Two variants: plain (the CMake build), compiled to SASS for every architecture, and with
# the half/bfloat16 macros that torch's CUDAExtension passes to nvcc (the setup.py build),
# which disable implicit conversions. The macros change what the source means, not the
# code generation, and every architecture compiles the same sm_80+ device code: the
# second variant is checked once, for sm_90a as PTX (the front end and NVVM, no ptxas).
torch_macros=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
              -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
all_archs=(-gencode arch=compute_80,code=sm_80
           -gencode arch=compute_86,code=sm_86
           -gencode arch=compute_90a,code=sm_90a)
ptx_only=(-gencode arch=compute_90a,code=compute_90a)

echo "compile_cuda: $("$nvcc" --version | tail -n 2 | head -n 1); CUTLASS headers: $cutlass"
for src in "${sources[@]}"; do
  rel="${src#"$root"/}"
  for variant in plain torch-extension; do
    if [[ "$variant" == torch-extension ]]; then
      extra=("${torch_macros[@]}" "${ptx_only[@]}")
      echo "compile_cuda: $rel  [sm_90a PTX; $variant]"
    else
      extra=("${all_archs[@]}")
      echo "compile_cuda: $rel  [sm_80, sm_86, sm_90a; $variant]"
    fi
    "$nvcc" -c "$src" -o "$out/$(basename "$src").$variant.o" \
      -std=c++17 -O3 -lineinfo \
      -I "$root/csrc" -isystem "$cutlass" \
      -Werror all-warnings -Xcompiler -Wall,-Werror \
      "${extra[@]}"
  done
done
echo "compile_cuda: OK, ${#sources[@]} file(s) compiled"
