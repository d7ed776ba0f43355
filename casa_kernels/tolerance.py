"""The accuracy contract every backend is held to (docs/design.md §7), shared by tests and
``verify``.

* fp32 and fp64 outputs are compared with the float64 reference under a fixed
  tolerance: ``|ours - ref64| <= atol + rtol * |ref64|`` elementwise.
* fp16/bf16 outputs are compared relative to what PyTorch itself achieves in that
  dtype, plus a few units of rounding of the output's two terms, elementwise::

      |ours - ref64| <= 2 * |ref_dtype - ref64| + c * u * (|ref64| + |ref64 - x|)

  ``ref_dtype`` is the reference run in the same low precision, ``u`` the dtype's unit
  roundoff (2^-8 for bfloat16, 2^-11 for float16), ``c`` = ``LOW_PRECISION_ULPS`` (2) and
  ``ref64 - x`` the attention term ``softmax(score) * (x Wv^T + bv)`` of y. The eps scales
  with y and with its attention term, not with 1: an output rounded once from fp32 is
  within ``u * |ref64|``, one whose attention term went through the dtype's roundings too
  within ``~u * (|ref64| + |attention|)``, and the elements where PyTorch happens to round
  exactly fall under that. An absolute eps would hide what matters most: the attention term
  is ~1/N of y, so a value read one row off or a dropped bias moves y by less than one ulp
  of y, yet by many ulps of the attention term — visible where x and the attention term
  cancel, where PyTorch's own error is small. (docs/design.md §7 gives the evidence.)

Gradients (``compare_gradient``) are sums over the batch and the variates: their rounding
error scales with the largest terms of the sum, not with each element, so one tensor's
scale is its largest float64 reference element. fp32/fp64: ``|ours - ref64| <= atol *
max|ref64| + rtol * |ref64|`` (the fixed tolerances above); fp16/bf16:
``|ours - ref64| <= 2 * |ref_dtype - ref64| + c * u * (|ref64| + max|ref64|)``, with
``ref_dtype`` the reference's autograd in the same low precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .weights import ScoreAttentionWeights

# Fixed tolerances for the full-precision dtypes.
FIXED_TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}
# The low-precision rule: unit roundoff per dtype, and how many units of |y| + |attention|.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
LOW_PRECISION_ULPS = 2
# An absolute eps per low-precision dtype (a few units in the last place at 1.0), for the
# comparisons of whole blocks and models, where there is no attention term to scale by.
LOW_PRECISION_EPS = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The attention term's own relative tolerance for the full-precision dtypes
# (compare_attention_term). Measured on the cpu, triton (interpreter) and reference
# backends, fp32, N = 7 to 1100, D = 16 to 512: at most 8e-7 is needed.
ATTENTION_TERM_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class Comparison:
    max_abs_error: float
    max_rel_error: float
    passed: bool
    rule: str


def reference_float64(x: torch.Tensor, weights: ScoreAttentionWeights) -> torch.Tensor:
    """The reference output in float64 on the CPU, from inputs of any dtype/device."""
    return reference.score_attention(
        x.detach().to("cpu", torch.float64), weights.to("cpu", torch.float64)
    )


def compare(
    out: torch.Tensor,
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    ref64: torch.Tensor | None = None,
) -> Comparison:
    """Checks ``out`` (a backend's output for ``x``/``weights``) against the reference."""
    if ref64 is None:
        ref64 = reference_float64(x, weights)
    got = out.detach().to("cpu", torch.float64)
    error = (got - ref64).abs()
    max_abs = error.max().item()
    max_rel = (error / ref64.abs().clamp_min(1e-6)).max().item()
    if out.dtype in FIXED_TOLERANCE:
        atol, rtol = FIXED_TOLERANCE[out.dtype]
        bound = atol + rtol * ref64.abs()
        rule = f"|err| <= {atol:g} + {rtol:g}*|ref64|"
    else:
        with torch.no_grad():
            same_dtype = reference.score_attention(x.detach(), weights)
        torch_error = (same_dtype.to("cpu", torch.float64) - ref64).abs()
        attention = ref64 - x.detach().to("cpu", torch.float64)
        eps = LOW_PRECISION_ULPS * UNIT_ROUNDOFF[out.dtype]
        bound = 2 * torch_error + eps * (ref64.abs() + attention.abs())
        rule = (
            f"|err| <= 2*|torch_{str(out.dtype).removeprefix('torch.')} err| "
            f"+ {eps:g}*(|ref64| + |ref64 - x|)"
        )
    passed = bool((error <= bound).all()) and bool(torch.isfinite(got).all())
    return Comparison(max_abs, max_rel, passed, rule)


def compare_attention_term(
    out: torch.Tensor,
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    ref64: torch.Tensor | None = None,
) -> Comparison:
    """Checks the attention term of ``out`` (fp32 or fp64), ``out - x``, against the float64
    reference's, ``a = ref64 - x = softmax(score) * (x Wv^T + bv)``, elementwise::

        |(out - x) - a| <= 2 * u * |ref64| + rtol * (|a| + mean |a|)

    ``u`` the unit roundoff of out's dtype (y is rounded once to it), ``rtol`` =
    ``ATTENTION_TERM_RTOL``; ``mean |a|`` over the whole tensor stands in where v + bv
    crosses zero. The attention term is ~1/N of y, so at large N :func:`compare`'s fixed
    tolerance on y is many times the term itself: an error in the scores (a wrong bias, a
    ReLU before its bias) moves the term by a fraction of it, which only this rule sees.
    """
    if out.dtype not in ATTENTION_TERM_RTOL:
        raise ValueError(
            f"out: expected dtype float32 or float64 (the attention term's tolerance), "
            f"received {out.dtype}"
        )
    if ref64 is None:
        ref64 = reference_float64(x, weights)
    attention = ref64 - x.detach().to("cpu", torch.float64)
    got = out.detach().to("cpu", torch.float64) - x.detach().to("cpu", torch.float64)
    error = (got - attention).abs()
    rtol, unit = ATTENTION_TERM_RTOL[out.dtype], torch.finfo(out.dtype).eps / 2
    bound = 2 * unit * ref64.abs() + rtol * (attention.abs() + attention.abs().mean())
    passed = bool((error <= bound).all()) and bool(torch.isfinite(got).all())
    max_rel = (error / attention.abs().clamp_min(1e-12)).max().item()
    rule = f"|err(y - x)| <= 2*{unit:.3g}*|ref64| + {rtol:g}*(|ref64 - x| + mean|ref64 - x|)"
    return Comparison(error.max().item(), max_rel, passed, rule)


def compare_with_exact(
    out: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor
) -> Comparison:
    """Checks ``out`` against ``exact`` (the same computation in float64) where there is no
    attention term to scale by (whole blocks and models), relative to the error of
    ``same_dtype``, PyTorch's eager computation in out's dtype, elementwise::

        |out - exact| <= 2 * |same_dtype - exact| + eps

    eps: ``atol + rtol * |exact|`` (``FIXED_TOLERANCE``) for fp32/fp64, ``LOW_PRECISION_EPS
    * max(|exact|, 1)`` for fp16/bf16 (relative above 1: LayerNorm outputs reach several
    units, where one bfloat16 ulp is eps). PyTorch's own error counts because LayerNorm
    amplifies the rounding of near-constant rows by up to 1/sqrt(eps) in any dtype.
    """
    got, exact = out.detach().to("cpu", torch.float64), exact.detach().to("cpu", torch.float64)
    error = (got - exact).abs()
    torch_error = (same_dtype.detach().to("cpu", torch.float64) - exact).abs()
    name = str(out.dtype).removeprefix("torch.")
    if out.dtype in FIXED_TOLERANCE:
        atol, rtol = FIXED_TOLERANCE[out.dtype]
        eps = atol + rtol * exact.abs()
        rule = f"|err| <= 2*|eager {name} err| + {atol:g} + {rtol:g}*|exact|"
    else:
        eps = LOW_PRECISION_EPS[out.dtype] * exact.abs().clamp_min(1.0)
        rule = f"|err| <= 2*|eager {name} err| + {LOW_PRECISION_EPS[out.dtype]:g}*max(|exact|, 1)"
    passed = bool((error <= 2 * torch_error + eps).all()) and bool(torch.isfinite(got).all())
    max_rel = (error / exact.abs().clamp_min(1e-6)).max().item()
    return Comparison(error.max().item(), max_rel, passed, rule)


def assert_close_to_reference(
    out: torch.Tensor, x: torch.Tensor, weights: ScoreAttentionWeights
) -> None:
    """Raises AssertionError with the errors when ``compare`` fails."""
    result = compare(out, x, weights)
    assert result.passed, (
        f"{out.dtype} output off the float64 reference: max abs {result.max_abs_error:.3g}, "
        f"max rel {result.max_rel_error:.3g}, rule {result.rule}"
    )


def compare_gradient(
    got: torch.Tensor, ref64: torch.Tensor, ref_dtype: torch.Tensor | None = None
) -> Comparison:
    """Checks ``got`` (a backend's gradient of x or of one weight) against the float64
    reference's gradient ``ref64``; ``ref_dtype``, the reference's gradient in ``got``'s
    dtype, is needed for fp16/bf16. Non-finite elements must sit where ``ref64``'s are,
    with the same values (NaN, +inf, -inf)."""
    got64 = got.detach().to("cpu", torch.float64)
    ref64 = ref64.detach().to("cpu", torch.float64)
    finite = torch.isfinite(ref64)
    same_pattern = torch.equal(torch.isfinite(got64), finite) and torch.equal(
        got64[~finite].nan_to_num(), ref64[~finite].nan_to_num()
    )
    error = (got64 - ref64).abs()[finite]
    ref = ref64[finite]
    scale = ref.abs().max() if ref.numel() else ref.new_zeros(())
    max_abs = error.max().item() if error.numel() else 0.0
    max_rel = (error / scale.clamp_min(1e-30)).max().item() if error.numel() else 0.0
    if got.dtype in FIXED_TOLERANCE:
        atol, rtol = FIXED_TOLERANCE[got.dtype]
        bound = atol * scale + rtol * ref.abs()
        rule = f"|err| <= {atol:g}*max|ref64| + {rtol:g}*|ref64|"
    else:
        if ref_dtype is None:
            raise ValueError(
                f"ref_dtype: expected the reference's {got.dtype} gradient, received None"
            )
        torch_error = (ref_dtype.detach().to("cpu", torch.float64) - ref64).abs()[finite]
        eps = LOW_PRECISION_ULPS * UNIT_ROUNDOFF[got.dtype]
        bound = 2 * torch_error.nan_to_num(posinf=0.0) + eps * (ref.abs() + scale)
        rule = (
            f"|err| <= 2*|torch_{str(got.dtype).removeprefix('torch.')} err| "
            f"+ {eps:g}*(|ref64| + max|ref64|)"
        )
    passed = same_pattern and bool((error <= bound).all())
    return Comparison(max_abs, max_rel, passed, rule)
