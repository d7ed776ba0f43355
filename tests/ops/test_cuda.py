"""What is specific to the ``cuda`` backend (csrc/cuda), docs/design.md §7: the raw op, batch
independence through the shared workspace, input checks, the exact workspace bound,
torch.compile, the registration, the nvcc compile check. What every backend must satisfy
(shapes, strides, gradients, opcheck, fuzzing, extremes, memory) is in test_conformance.py.

GPU tests need a CUDA device and an extension built with CUDA; elsewhere they are
skipped with the reason. The compile check of the CUDA sources and the backend's
reporting run everywhere nvcc / the package are present.
"""

import glob
import os
import shutil
import subprocess

import pytest
import torch

import casa_kernels
from casa_kernels import CASABlock, casa_attention
from casa_kernels.ops.registry import get_backend
from casa_kernels.tolerance import assert_close_to_reference
from tests.conftest import make_problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return get_backend("cuda").unavailable_reason()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_backend():
    """Skips (with the backend's own reason) when the cuda backend cannot run here."""
    reason = _cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


@needs_cuda
def test_direct_op_call_matches_backend(cuda_backend):
    x, w = make_problem(2, 50, 32, 3, device="cuda", seed=5)
    direct = torch.ops.casa.fused_score_attention(x, *w)
    assert torch.equal(direct, casa_attention(x, w, backend="cuda"))
    assert_close_to_reference(direct, x, w)


@needs_cuda
def test_batch_elements_independent(cuda_backend):
    # Each batch element's output depends on that element only (no cross-talk
    # through the shared workspace or the split head reduction).
    x, w = make_problem(3, 300, 64, 5, device="cuda", seed=6)
    full = casa_attention(x, w, backend="cuda")
    for b in range(x.shape[0]):
        alone = casa_attention(x[b : b + 1], w, backend="cuda")
        torch.testing.assert_close(full[b : b + 1], alone, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_rejects_bad_inputs(cuda_backend):
    x, w = make_problem(1, 4, 16, 3, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.casa.fused_score_attention(x, *w)
    x, w = make_problem(1, 4, 16, 3, device="cuda")
    with pytest.raises(RuntimeError, match="expected dtype"):
        torch.ops.casa.fused_score_attention(x.half(), *w)
    with pytest.raises(RuntimeError, match="expected device"):
        torch.ops.casa.fused_score_attention(x, *w[:-1], w[-1].cpu())


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_raw_op_takes_packed_and_contiguous_conv_weights_and_offset_views(cuda_backend, dtype):
    # The op reads the conv weights packed per tap (what the backend passes) or contiguous
    # (packed by the binding), and copies an x that does not start on 16 bytes (the
    # cp.async vectors).
    from casa_kernels.ops.backends.cuda import TAP_PACKED, packed_taps

    x, w = make_problem(2, 37, 24, 5, dtype=dtype, device="cuda", seed=11)
    flat = torch.empty(x.numel() + 2, dtype=dtype, device="cuda")
    flat[2:].copy_(x.reshape(-1))
    x_offset = flat[2:].view(x.shape)
    assert x_offset.is_contiguous() and x_offset.data_ptr() % 16 != 0
    natural = torch.ops.casa.fused_score_attention(x_offset, *w)
    packed = torch.ops.casa.fused_score_attention(
        x_offset,
        *[
            packed_taps(t, TAP_PACKED[name]) if name in TAP_PACKED else t
            for name, t in zip(w._fields, w)
        ],
    )
    assert_close_to_reference(natural, x, w)
    assert_close_to_reference(packed, x, w)


@needs_cuda
def test_no_bnd_intermediate(cuda_backend):
    # docs/design.md §5: apart from the output, temporary memory is O(B·D²). With N ≫ D, a
    # single [B, N, D] fp32 intermediate would double the peak.
    batch, n_vars, d_model = 2, 40000, 64
    x, w = make_problem(batch, n_vars, d_model, 3, device="cuda", seed=7)
    casa_attention(x, w, backend="cuda")  # warm-up: caching allocator, module load
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = casa_attention(x, w, backend="cuda")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    output_bytes = out.numel() * out.element_size()
    # gpu::workspace_floats with the most head splits: head partials and activations, the
    # bottleneck's split-K partials (at most 4 splits of a layer's 32 x 64 tiles, 2 per
    # batch element at D = 64), plus the tail's column (max, sum) per 64-row tile:
    # O(B·D² + B·D·N/64).
    row_tiles = -(-n_vars // 64)
    split_k = 4 * 2 * batch * 32 * 64
    workspace_bound = (
        (32 + 5) * batch * d_model * d_model // 8 + split_k + 2 * batch * row_tiles * d_model
    ) * 4
    assert extra <= output_bytes + workspace_bound + (1 << 20), (extra, output_bytes)


@needs_cuda
def test_opcheck_fused_op(cuda_backend):
    x, w = make_problem(2, 9, 16, 3, device="cuda", seed=9)
    # The extension op has no fake kernel of its own: check schema and dispatch only.
    torch.library.opcheck(
        torch.ops.casa.fused_score_attention.default, (x, *w), test_utils=("test_schema",)
    )


@needs_cuda
def test_torch_compile_fullgraph(cuda_backend):
    torch.manual_seed(0)
    block = CASABlock(n_vars=11, d_model=32, kernel=3, backend="cuda").cuda()
    x = torch.randn(3, 11, 32, device="cuda")
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# --- run everywhere ---------------------------------------------------------------


def test_backend_registered_with_reason():
    backend = get_backend("cuda")
    assert backend.device_types == frozenset({"cuda"})
    assert backend.dtypes == frozenset(DTYPES)
    reason = casa_kernels.availability()["cuda"]
    if not torch.cuda.is_available():
        assert isinstance(reason, str) and reason
        x, w = make_problem(1, 3, 8, 3)
        with pytest.raises(RuntimeError, match="cuda"):
            casa_attention(x, w, backend="cuda")


def test_cpu_tensor_not_served():
    reason = get_backend("cuda").reason_not_serving(torch.device("cpu"), torch.float32)
    assert reason is not None


def _find_nvcc() -> str | None:
    found = os.environ.get("NVCC") or shutil.which("nvcc")
    if found:
        return found
    for candidate in sorted(glob.glob("/usr/local/cuda*/bin/nvcc")):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def test_cuda_sources_compile():
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, NVCC, /usr/local/cuda*/bin)")
    result = subprocess.run(
        ["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh")],
        env={**os.environ, "NVCC": nvcc},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "score_attention_kernels.cu" in result.stdout


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["enc0_weight", "enc2_weight", "dec1_weight", "dec2_weight"])
def test_packed_taps_are_views_of_zero_padded_per_tap_matrices_made_once(name, dtype):
    # The layout the conv kernel copies in 16-byte vectors (csrc/cuda/launch_plan.h,
    # packed_row) and the binding's packed_taps recognises by its strides: one [Cout, Cin]
    # matrix per tap, rows padded with zeros to 16 bytes.
    from casa_kernels.ops import weight_cache
    from casa_kernels.ops.backends.cuda import TAP_PACKED, packed_taps

    _, w = make_problem(1, 5, 40, 3, dtype=dtype)  # Cin of 5, 20, 20, 10: ragged rows
    weight = getattr(w, name).clone()
    transposed = TAP_PACKED[name]
    packed = packed_taps(weight, transposed)
    assert packed.shape == weight.shape and torch.equal(packed, weight)
    cout, cin = (weight.shape[1], weight.shape[0]) if transposed else weight.shape[:2]
    vec = 16 // weight.element_size()
    row = -(-cin // vec) * vec
    expected = (1, row, cout * row) if transposed else (row, 1, cout * row)
    assert packed.stride() == expected and packed.data_ptr() % 16 == 0
    base = torch.as_strided(packed, (3, cout, row), (cout * row, row, 1))
    assert torch.equal(base[:, :, cin:], torch.zeros_like(base[:, :, cin:]))
    for j in range(3):
        tap = weight[:, :, j].t() if transposed else weight[:, :, j]
        assert torch.equal(base[j, :, :cin], tap)
    assert packed_taps(weight, transposed).data_ptr() == packed.data_ptr()  # cached
    with torch.no_grad():
        weight.add_(1)
    assert torch.equal(packed_taps(weight, transposed), weight)
    weight_cache.clear()
