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
  last share, d enc0) as library convolution backwards on the saved activations, each
  after its ReLU's backward (the gradient where the output is > 0 or NaN, as autograd's).

Any subset of gradients (needs) costs only what it needs: no tail launch without dv or
ds, no value projection without ds, no convolution below the lowest layer whose parameters
(or x) need a gradient. Weights with a NaN or inf run on the reference, forward and
backward (``finite_weights``).
"""

from __future__ import annotations

import torch

from ...weights import ScoreAttentionWeights
from ..finite_weights import weights_all_finite
from ..registry import FusedBackward

_FIELDS = ScoreAttentionWeights._fields
# The score network's convolutions below h5, top down: (weight name, transposed).
# Activation i is layer i's input (h1, enc1's, enc2's, dec0's outputs; h5 is index 4).
_BOTTLENECK = (("dec1", True), ("dec0", True), ("enc2", False), ("enc1", False))


def forward_saving(x: torch.Tensor, weights: ScoreAttentionWeights):
    """``(y, saved)`` with saved = (h1, enc1, enc2, dec0 outputs, h5, col_max, col_sum), or
    None for non-finite weights (the reference serves those)."""
    from ..triton_kernels import forward_saving as run

    if not weights_all_finite(weights):
        return None
    out = run(x, weights)
    return out.y, (*out.activations, out.col_max, out.col_sum)


def _conv_backward(d_out, inp, weight, transposed: bool, mask):
    """``(d_in, d_weight)`` (None where ``mask`` says) of a stride-2 conv (``transposed``:
    transposed conv, output_padding 1) with padding k//2 and no bias, at ``inp``."""
    p = weight.shape[2] // 2
    d_in, d_weight, _ = torch.ops.aten.convolution_backward(
        d_out,
        inp,
        weight,
        None,
        [2],
        [p],
        [1],
        transposed,
        [1 if transposed else 0],
        1,
        [mask[0], mask[1], False],
    )
    return d_in, d_weight


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
    # The convolutions below h5, top down: the bottleneck's four, then enc0 (index 4).
    chain = [name for name, _ in _BOTTLENECK] + ["enc0"]
    wanted = [
        want[f"{name}_weight"] or want[f"{name}_bias"] or (name == "enc0" and want["x"])
        for name in chain
    ]
    lowest = max((i for i, wanted_here in enumerate(wanted) if wanted_here), default=-1)
    want_dh5 = lowest >= 0
    want_dt = want_dh5 or want["dec2_weight"] or want["dec2_bias"]
    want_dv = want["x"] or want["value_weight"] or want["value_bias"]

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
        want_dv=want_dv,
        want_dt=want_dt,
    )
    rows = B * N
    if want["value_weight"]:
        grads["value_weight"] = tail.dv.view(rows, D).t() @ x.view(rows, D)
    if want["value_bias"]:
        grads["value_bias"] = tail.dv.sum((0, 1))
    dx = tail.dx
    if dx is not None:
        dx.view(rows, D).addmm_(tail.dv.view(rows, D), w.value_weight)
    if not want_dt:
        return tuple(grads[name] for name in want)

    d_h5, grads["dec2_weight"], grads["dec2_bias"] = torch.ops.aten.convolution_backward(
        tail.dt,
        h5.to(x.dtype),
        w.dec2_weight,
        [N],
        [2],
        [w.kernel // 2],
        [1],
        True,
        [1],
        1,
        [want_dh5, want["dec2_weight"], want["dec2_bias"]],
    )
    if not want["dec2_weight"]:
        grads["dec2_weight"] = None
    if not want["dec2_bias"]:
        grads["dec2_bias"] = None
    if not want_dh5:
        return tuple(grads[name] for name in want)

    # The bottleneck in fp32 on the saved activations, channels-first: h1, enc1's, enc2's,
    # dec0's outputs, h5; layer i (top down) reads activation 3 - i and gives 4 - i.
    act = [a.transpose(1, 2).float().contiguous() for a in activations[:-1]] + [h5.float()]
    d_out = d_h5.float()
    for i, (name, transposed) in enumerate(_BOTTLENECK):
        pre = _relu_backward(d_out, act[4 - i])
        if want[f"{name}_bias"]:
            grads[f"{name}_bias"] = pre.sum((0, 2)).to(x.dtype)
        weight = getattr(w, f"{name}_weight").float()
        d_in, d_weight = _conv_backward(
            pre, act[3 - i], weight, transposed, (lowest > i, want[f"{name}_weight"])
        )
        if d_weight is not None:
            grads[f"{name}_weight"] = d_weight.to(x.dtype)
        if lowest == i:
            return tuple(grads[name] for name in want)
        d_out = d_in

    pre = _relu_backward(d_out, act[0])  # h1
    if want["enc0_bias"]:
        grads["enc0_bias"] = pre.sum((0, 2)).to(x.dtype)
    dx_head, grads["enc0_weight"] = _conv_backward(
        pre.to(x.dtype), x, w.enc0_weight, False, (want["x"], want["enc0_weight"])
    )
    if dx is not None:
        dx.add_(dx_head)
    grads["x"] = dx
    return tuple(grads[name] for name in want)


FUSED_BACKWARD = FusedBackward(forward_saving, backward)
