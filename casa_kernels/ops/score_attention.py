"""The op ``casa::score_attention`` and the functional entry point ``casa_attention``.

Schema (defined once, here, so that it exists without a compiled extension)::

    casa::score_attention(Tensor x, Tensor value_weight, Tensor value_bias,
                          Tensor enc0_weight, ..., Tensor dec2_bias, str backend) -> Tensor

The weights come in the order of :class:`~casa_kernels.weights.ScoreAttentionWeights`.
One kernel, registered for every device, hands the call to the named backend of the
registry (raising, with every backend's reason, if it cannot serve the input); an
empty batch returns an empty result without calling a backend. The fake kernel gives
``empty_like(x)``. The op's autograd (``_ScoreAttentionFunction``) uses the served
backend's own backward where it has one (``Backend.fused_backward``: the cpu backend's,
docs/design.md §5.8, and the triton backend's, §5.9) for eager calls on plain tensors, saving what that backward needs;
otherwise (other backends, tracing and compiling, B = 0) it saves the inputs and
differentiates the reference recomputed from them.
``casa_attention`` resolves the backend once, with the problem's shape, and runs that
kernel's body itself (``_forward_on``) in eager inference on plain tensors, where nothing
needs the dispatch (``_needs_dispatcher``).

Autocast: under ``torch.autocast(device, dtype)`` the op runs in the autocast dtype —
x and every weight of float16/bfloat16/float32 are cast to it (float64 is left alone,
as autocast does) and the fused backends accumulate in fp32. ``casa_attention`` casts
weights that need no gradient once per weight version (``weight_cache``); the op's own
autocast kernels cast whatever reaches the op directly.
"""

from __future__ import annotations

import torch

from .. import reference
from ..validation import check_like_weights, check_tokens, check_weights
from ..weights import ScoreAttentionWeights
from .registry import FALLBACK, Backend, ProblemShape, get_backend, resolve_backend
from .weight_cache import cached

OP_NAME = "casa::score_attention"
_FIELDS = ScoreAttentionWeights._fields

torch.library.define(
    OP_NAME,
    "(Tensor x, " + ", ".join(f"Tensor {f}" for f in _FIELDS) + ", str backend) -> Tensor",
)
_OP = torch.ops.casa.score_attention.default


def _forward_on(chosen: Backend, x: torch.Tensor, weights: ScoreAttentionWeights) -> torch.Tensor:
    """The op's computation on a backend that serves the inputs (B = 0: empty)."""
    if x.shape[0] == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return _forward_captured(chosen, x, weights)
    return chosen.forward(x, weights)


def _forward_captured(
    chosen: Backend, x: torch.Tensor, weights: ScoreAttentionWeights
) -> torch.Tensor:
    """The forward inside a CUDA graph capture, where a first call cannot autotune, compile
    or check and pack its weights (each needs the host): a failure says to warm up."""
    try:
        return chosen.forward(x, weights)
    except Exception as error:
        raise RuntimeError(
            f"casa_kernels: the {chosen.name!r} backend failed inside a CUDA graph capture "
            f"({type(error).__name__}: {error}). A first call for a shape, dtype and set of "
            "weights autotunes, compiles and prepares the weights, which a capture does not "
            "allow: run one call outside the capture first (a warm-up), then capture."
        ) from error


@torch.library.register_kernel(OP_NAME, None)
def _score_attention_kernel(x: torch.Tensor, *weights_and_backend) -> torch.Tensor:
    *weights, backend = weights_and_backend
    weights = ScoreAttentionWeights(*weights)
    chosen = resolve_backend(backend, x.device, x.dtype, ProblemShape.of(x, weights))
    return _forward_on(chosen, x, weights)


@torch.library.register_fake(OP_NAME)
def _score_attention_fake(x: torch.Tensor, *weights_and_backend) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _with_fused_backward(x: torch.Tensor, weights, backend: str) -> Backend | None:
    """The backend serving this call where it has its own backward, else None (the
    reference's backward). Only for plain tensors in eager mode (under tracing, compiling,
    fake tensors and dispatch modes the op differentiates the reference) and B > 0."""
    if x.dim() != 3 or x.shape[0] == 0 or not _plain_eager(x, weights):
        return None
    w = ScoreAttentionWeights(*weights)
    chosen = resolve_backend(backend, x.device, x.dtype, ProblemShape.of(x, w), training=True)
    return chosen if chosen.fused_backward is not None else None


class _ScoreAttentionFunction(torch.autograd.Function):
    """The op's autograd: the served backend's fused backward where it has one (saving what
    that backward needs), else the reference's, recomputed from the saved inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights_backend_keyset):
        *weights, backend, keyset = weights_backend_keyset
        # Resolved above the guard: a first "auto" call may run the CPU probe's own autograd.
        chosen = _with_fused_backward(x, weights, backend)
        with torch._C._AutoDispatchBelowAutograd():
            run = None
            if chosen is not None:
                run = chosen.fused_backward.forward(x, ScoreAttentionWeights(*weights))
            if run is None:
                y, saved, chosen = _below_autograd(keyset, (x, *weights, backend)), (), None
            else:
                y, saved = run
        ctx.fused = None if chosen is None else chosen.fused_backward
        ctx.backend = None if chosen is None else chosen.name
        ctx.save_for_backward(x, *weights, *saved)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, *rest = ctx.saved_tensors
        weights = ScoreAttentionWeights(*rest[: len(_FIELDS)])
        needs = ctx.needs_input_grad[: 1 + len(_FIELDS)]
        if ctx.fused is None:
            return (*_reference_backward(grad_output, x, weights, needs), None, None)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "casa::score_attention: double backward (create_graph=True) is not supported "
                f"by the {ctx.backend} backend's fused backward, which served this call; "
                "use backend='reference' to differentiate twice"
            )
        saved = tuple(rest[len(_FIELDS) :])
        return (*ctx.fused.backward(grad_output, x, weights, saved, needs), None, None)


def _reference_backward(grad_output, x, weights, needs):
    """The gradients (None where not needed) of the reference op at the saved inputs."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, *weights), needs)]
        out = reference.score_attention(leaves[0], ScoreAttentionWeights(*leaves[1:]))
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_output) if wanted else ())
    return tuple(next(grads) if need else None for need in needs)


def _below_autograd(keyset, args) -> torch.Tensor:
    """The op's kernel below the Autograd key (as torch.library.register_autograd's)."""
    with torch._C._AutoDispatchBelowAutograd():
        return _OP.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _autograd_kernel(keyset, x: torch.Tensor, *weights_and_backend) -> torch.Tensor:
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, *weights_and_backend[:-1]):
        return _ScoreAttentionFunction.apply(x, *weights_and_backend, keyset)
    return _below_autograd(keyset, (x, *weights_and_backend))


def _autocasts(t: torch.Tensor) -> bool:
    """Whether autocast casts ``t`` (floating, not float64: autocast's own rule)."""
    return t.is_floating_point() and t.dtype != torch.float64


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes ``x`` in on its device, None where it does not apply."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if _autocasts(x) else None


def _autocast_kernel(device_type: str, x: torch.Tensor, *weights_and_backend):
    *weights, backend = weights_and_backend
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t.to(dtype) if _autocasts(t) else t for t in (x, *weights)]
    with torch.autocast(device_type, enabled=False):
        return torch.ops.casa.score_attention(*cast, backend)


_autocast_lib = torch.library.Library("casa", "IMPL")
_autocast_lib.impl("score_attention", _autograd_kernel, "Autograd", with_keyset=True)
_autocast_lib.impl("score_attention", lambda *a: _autocast_kernel("cpu", *a), "AutocastCPU")
_autocast_lib.impl("score_attention", lambda *a: _autocast_kernel("cuda", *a), "AutocastCUDA")


def _weight_in(dtype: torch.dtype, w: torch.Tensor) -> torch.Tensor:
    """``w`` cast to ``dtype`` for autocast: once per weight version where no gradient is due."""
    if not _autocasts(w) or w.dtype == dtype:
        return w
    if w.requires_grad and torch.is_grad_enabled():
        return w.to(dtype)  # autograd carries the gradient back to the fp32 weight
    return cached(f"autocast.{dtype}", (w,), lambda: w.to(dtype))


def casa_attention(
    x: torch.Tensor, weights: ScoreAttentionWeights, *, backend: str = "auto"
) -> torch.Tensor:
    """CASA attention: ``softmax_over_N(score(x)) * (x Wvᵀ + bv) + x``.

    Args:
        x: ``[B, N, D]`` floating tensor; N = ``weights.n_vars``, D = ``weights.d_model``.
        weights: the 14 parameters, same dtype and device as ``x``.
        backend: ``"auto"`` (default; ``CASA_BACKEND`` overrides it), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B, N, D]`` tensor of ``x``'s dtype (under autocast: the autocast dtype, or
        whatever the reference's own ops give when the reference runs), contiguous.
        B may be 0.
    """
    return attention_on_backend(x, weights, backend)[0]


def attention_on_backend(
    x: torch.Tensor, weights: ScoreAttentionWeights, backend: str
) -> tuple[torch.Tensor, Backend]:
    """:func:`casa_attention` and the backend that ran it (the modules ask it for its
    capabilities). The inputs are validated and the backend resolved here, once, with the
    problem's shape: ``auto`` passes over a backend whose shape limits the input exceeds."""
    weights = check_weights(weights)
    x = check_tokens(x, weights.n_vars, weights.d_model)
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is None:
        x = check_like_weights(x, weights)
    dtype = autocast_dtype or x.dtype
    shape = ProblemShape.of(x, weights)
    training = _differentiated(x, weights)
    if torch.compiler.is_compiling():
        # The choice is a constant of the graph, made with the shape where it is static
        # (symbolic sizes: without it; the op then checks the shape limits when it runs).
        static = shape is not None and all(type(size) is int for size in shape)
        sizes = tuple(shape) if static else None
        chosen = get_backend(_resolved_name(backend, x.device, dtype, sizes, training))
    else:
        chosen = resolve_backend(backend, x.device, dtype, shape, training=training)
    if chosen.name == FALLBACK:
        # Plain PyTorch: autograd, autocast and torch.compile see straight through it.
        return reference.score_attention(x, weights), chosen
    if autocast_dtype is not None:
        weights = ScoreAttentionWeights(*(_weight_in(autocast_dtype, w) for w in weights))
        x = check_like_weights(x.to(autocast_dtype), weights)
    if _needs_dispatcher(x, weights):
        return torch.ops.casa.score_attention(x, *weights, chosen.name), chosen
    return _forward_on(chosen, x, weights), chosen  # what the op would run, without its dispatch


def _needs_dispatcher(x: torch.Tensor, weights: ScoreAttentionWeights) -> bool:
    """Whether a call must go through the op rather than straight to its backend: for
    autograd, tracing and compiling, tensor subclasses, functorch transforms, torch
    function and dispatch modes (FakeTensor, FlopCounterMode, ...) and the profiler's
    record of the op. Eager inference on plain tensors skips the dispatch (about 20 us a
    call: docs/design.md §6)."""
    if not _plain_eager(x, weights) or torch._C._autograd._profiler_enabled():
        return True
    return _differentiated(x, weights)


def _differentiated(x: torch.Tensor, weights: ScoreAttentionWeights) -> bool:
    """Whether autograd records the call: gradients enabled and an input requiring one."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))


def _plain_eager(x: torch.Tensor, weights) -> bool:
    """Whether this is an eager call on plain tensors: no compiling or tracing, no torch
    function or dispatch mode, no functorch transform, no tensor subclass."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return all(type(t) in _PLAIN for t in (x, *weights))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


@torch.compiler.assume_constant_result
def _resolved_name(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    sizes: tuple[int, ...] | None,
    training: bool,
) -> str:
    # A constant for torch.compile: availability and CASA_BACKEND are fixed per process.
    # ``sizes``: a ProblemShape's fields as a plain tuple (what the compiler passes on).
    shape = None if sizes is None else ProblemShape(*sizes)
    return resolve_backend(backend, device, dtype, shape, training=training).name
