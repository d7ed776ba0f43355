"""The ``triton`` backend's fused backward (docs/design.md §5.9): what the op's autograd runs
for inputs the triton backend served (``Backend.fused_backward``).

Forward for training: the backend's own forward (``triton_kernels.forward_saving``, the
same nine launches), keeping what it computes on the way. Saved for the backward, besides
x and the weights: the score network's activations h1, enc1's, enc2's and dec0's outputs
(channels-last ``[B, length, channels]`` in x's dtype, ``D²/8`` elements each per batch
element), h5 (fp32 ``[B, D/4, D/2]``) and the tail's merged column statistics (fp32
``[B, D]`` each); nothing of size ``[B, N, D]``.

Backward, no host synchronisation (capturable in a CUDA graph once warmed up):

- the tail on the Triton kernels (``triton_kernels.tail_backward``): g + ds, dv = P ⊙ g and
  dt = ds ⊙ σ' tile by tile, the scores recomputed from h5 and the statistics;
- the value projection's GEMMs on dv (``dx += dv Wv``, ``dWv = dvᵀ x``, ``dbv = Σ dv``) and
  the last transposed conv's backward on dt (dh5, d dec2), as library ops;
- the bottleneck's four convs (O(B·D³), independent of N) in fp32 and the first conv (dx's
  last share, d enc0) on the saved activations, each after its ReLU's backward (the
  gradient where the output is > 0 or NaN, as autograd's): input gradients by the
  library's convolution backward, weight gradients as im2col GEMMs per tap.

Any subset of gradients (needs) costs only what it needs: no tail launch without dv or
ds, no value projection without ds, no convolution below the lowest layer whose parameters
(or x) need a gradient. Weights with a NaN or inf run on the reference, forward and
backward (``finite_weights``).
"""

from __future__ import annotations

import functools

import torch

from ...weights import ScoreAttentionWeights
from ..finite_weights import weights_all_finite
from ..registry import FusedBackward

_FIELDS = ScoreAttentionWeights._fields
# The score network's convolutions from the top (the tail's dec2) down to the head's enc0;
# a name starting with "dec" is a transposed conv.
_CONVS = ("dec2", "dec1", "dec0", "enc2", "enc1", "enc0")


def forward_saving(x: torch.Tensor, weights: ScoreAttentionWeights):
    """``(y, saved)`` with saved = (h1, enc1, enc2, dec0 outputs, h5, col_max, col_sum), or
    None for non-finite weights (the reference serves those)."""
    from ..triton_kernels import forward_saving as run

    if not weights_all_finite(weights):
        return None
    out = run(x, weights)
    return out.y, (*out.activations, out.col_max, out.col_sum)


def _weight_grad(d_out: torch.Tensor, inp: torch.Tensor, k: int, transposed: bool) -> torch.Tensor:
    """dL/dweight of a stride-2 conv with padding k//2 at ``inp: [B, Cin, L]`` from
    ``d_out: [B, Cout, L/2]`` (weight ``[Cout, Cin, k]``), or of a stride-2 transposed conv
    (output_padding 1) from ``d_out: [B, Cout, 2L]`` (weight ``[Cin, Cout, k]``). As an
    im2col GEMM per tap: the zero padding is multiplied, as in the float64 reference's
    convolutions (0 · inf is NaN there; the library's fp32 convolutions skip the padding)."""
    p = k // 2
    strided, other = (d_out, inp) if transposed else (inp, d_out)
    padded = torch.nn.functional.pad(strided, (p, p))
    length = other.shape[2]
    taps = [
        torch.einsum("bol,bcl->oc", other, padded[:, :, j : j + 2 * length : 2]) for j in range(k)
    ]
    return torch.stack(taps, dim=2)


def _input_grad(d_out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, transposed: bool):
    """dL/d``inp`` of the conv of :func:`_weight_grad` with ``weight`` (library op)."""
    return torch.ops.aten.convolution_backward(
        d_out,
        inp,
        weight,
        None,
        [2],
        [weight.shape[2] // 2],
        [1],
        transposed,
        [1 if transposed else 0],
        1,
        [True, False, False],
    )[0]


def _relu_backward(d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``d`` where the ReLU's output ``out`` is > 0 or NaN, else 0 (autograd's rule), in place."""
    return d.masked_fill_(out <= 0, 0)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    saved: tuple[torch.Tensor, ...],
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of x and the 14 weights (None where ``needs`` is False) for grad_y."""
    from ..triton_kernels import tail_backward

    *activations, col_max, col_sum = saved
    h5 = activations[-1]
    w = weights
    want = dict(zip(("x", *_FIELDS), needs))
    grads = dict.fromkeys(want)
    wanted = [want[f"{name}_weight"] or want[f"{name}_bias"] for name in _CONVS]
    wanted[-1] = wanted[-1] or want["x"]
    lowest = max((i for i, wanted_here in enumerate(wanted) if wanted_here), default=-1)

    x = x.contiguous()
    B, N, D = x.shape
    tail = tail_backward(
        grad_y.to(x.dtype).contiguous(),
        x,
        h5,
        w,
        col_max,
        col_sum,
        want_dx=want["x"],
        want_dv=want["x"] or want["value_weight"] or want["value_bias"],
        want_dt=lowest >= 0,
    )
    rows = B * N
    if want["value_weight"]:
        grads["value_weight"] = tail.dv.view(rows, D).t() @ x.view(rows, D)
    if want["value_bias"]:
        grads["value_bias"] = tail.dv.sum((0, 1))
    if want["x"]:
        tail.dx.view(rows, D).addmm_(tail.dv.view(rows, D), w.value_weight)

    @functools.cache
    def activation(j: int) -> torch.Tensor:
        """h1, enc1's, enc2's, dec0's outputs, h5 (j = 0 … 4): fp32 ``[B, channels, length]``."""
        a = activations[j]
        return a.float() if j == 4 else a.transpose(1, 2).float().contiguous()

    # The convolutions from dec2 down to the lowest one wanted, each from its output's
    # gradient (dt for dec2, else through its ReLU): the bottleneck's four in fp32, dec2 and
    # enc0 (K over N) in x's dtype. Layer i reads activation 4 - i and gives 5 - i.
    d_out = tail.dt
    for i, name in enumerate(_CONVS[: lowest + 1]):
        with torch.profiler.record_function(f"casa::triton backward {name}"):
            if i > 0:
                d_out = _relu_backward(d_out.float(), activation(5 - i))
            if want[f"{name}_bias"]:
                grads[f"{name}_bias"] = d_out.sum((0, 2)).to(x.dtype)
            dtype = torch.float32 if 0 < i < 5 else x.dtype
            inp = h5.to(x.dtype) if i == 0 else x if i == 5 else activation(4 - i)
            d_out = d_out.to(dtype)
            weight = getattr(w, f"{name}_weight").to(dtype)
            transposed = name.startswith("dec")
            if want[f"{name}_weight"]:
                grad = _weight_grad(d_out, inp, w.kernel, transposed)
                grads[f"{name}_weight"] = grad.to(x.dtype)
            if i < lowest or (i == 5 and want["x"]):
                d_out = _input_grad(d_out, inp, weight, transposed)
    if want["x"]:
        grads["x"] = tail.dx.add_(d_out)
    return tuple(grads[name] for name in want)


FUSED_BACKWARD = FusedBackward(forward_saving, backward)
