"""What the benchmarks time: CASA backends, torch.compile of the reference, full attention.

A provider builds, for one benchmark point, a zero-argument callable running the forward
(the op alone for the ``attention``/``scaling`` suites, the whole forecaster for
``model``), or at a point of the ``train`` suite its training variant
(:mod:`bench.training`: the op's forward+backward, the forecaster's training step). Every
provider says upfront whether it can run on a device/dtype (a reason when not) and
estimates the memory it needs, so that the runner can skip it instead of crashing.

=================  ==========================================================================
provider           what runs
=================  ==========================================================================
casa-<backend>     ``casa_attention(x, w, backend=<backend>)`` (model: CASAModel with that
                   backend), one per backend of the registry (``casa_kernels.backend_names()``:
                   reference, cpu, triton, cuda, ...), on the device types where
                   ``backend="auto"`` may choose it (so not triton's CPU interpreter)
casa-compile       ``torch.compile`` of the reference functional (model: of CASAModel, reference)
full-einsum        iTransformer's attention layer as published (QKVO, 8 heads, einsum scores)
full-sdpa          the same layer with ``scaled_dot_product_attention``
gemm-peak          ``torch.mm`` of two 2048 × 2048 matrices in the point's dtype: this
                   machine's GEMM rate, timed beside the others so that the results page can
                   give each op's FLOP rate as a share of it (only when named in
                   ``--providers``)
=================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import casa_kernels
from casa_kernels import CASAModel, ScoreAttentionWeights, casa_attention
from casa_kernels.baselines import FullAttention, ITransformerModel
from casa_kernels.ops import registry

from . import training
from .training import Subject

N_HEADS = 8
# Copies of the [B, H, N, N] score tensor alive at once in the einsum path
# (scores, scaled scores, softmax output).
EINSUM_SCORE_COPIES = 3
# Training: [B, N, D]-sized activations autograd saves per layer (a generous count), and
# one [B, H, N, N] softmax output per einsum layer.
SAVED_PER_LAYER = 20


# Sweeps over the dataset shapes: the inference suites' and the train suite's.
SHAPE_SWEEPS = ("dataset", "op-dataset", "step-dataset")


@dataclass(frozen=True)
class Point:
    """One benchmark configuration. ``seq_len``/``e_layers``/``pred_len`` are None for op-level points."""

    suite: str
    sweep: str
    batch: int
    n_vars: int
    d_model: int
    kernel: int = 3
    seq_len: int | None = None
    pred_len: int | None = None
    e_layers: int | None = None
    # The ``train`` suite's points: the op's forward+backward, the forecaster's training step.
    training: bool = False

    @property
    def model_level(self) -> bool:
        return self.seq_len is not None

    @property
    def grows(self) -> bool:
        """Whether the point is on a sweep along which a provider stops growing after an oom
        or timeout (every sweep but the dataset shapes)."""
        return self.sweep not in SHAPE_SWEEPS


@dataclass(frozen=True)
class Provider:
    name: str
    family: str  # "casa" or "full"
    build: Callable[[Point, str, torch.dtype], Callable[[], torch.Tensor]]
    unavailable: Callable[[str, torch.dtype], str | None]
    estimate_bytes: Callable[[Point, torch.dtype], int]


def _seeded(point: Point, stream: int = 0) -> torch.Generator:
    """A generator for the point's random tensors; ``stream`` numbers independent ones."""
    return torch.Generator().manual_seed(1000 * point.n_vars + point.d_model + 7919 * stream)


def _op_input(point: Point, device: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(point.batch, point.n_vars, point.d_model, generator=_seeded(point))
    return x.to(device=device, dtype=dtype)


def _model_input(point: Point, device: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(point.batch, point.seq_len, point.n_vars, generator=_seeded(point))
    return x.to(device=device, dtype=dtype)


def _casa_model(point: Point, backend: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CASAModel(
        n_vars=point.n_vars,
        d_model=point.d_model,
        kernel=point.kernel,
        seq_len=point.seq_len,
        pred_len=point.pred_len,
        e_layers=point.e_layers,
        backend=backend,
    )
    return model.to(device=device, dtype=dtype).train(point.training)


def _op_weights(point: Point, device: str, dtype: torch.dtype) -> ScoreAttentionWeights:
    return ScoreAttentionWeights.random(
        point.n_vars,
        point.d_model,
        point.kernel,
        dtype=dtype,
        device=device,
        generator=_seeded(point),
    )


def _module_subject(model: torch.nn.Module, x: torch.Tensor, run=None) -> Subject:
    """``run`` (default: ``model`` itself) on ``x``, learning ``model``'s parameters."""
    return Subject(model if run is None else run, x, tuple(model.parameters()))


def _casa_subject(backend: str):
    def subject(point: Point, device: str, dtype: torch.dtype) -> Subject:
        if point.model_level:
            model = _casa_model(point, backend, device, dtype)
            return _module_subject(model, _model_input(point, device, dtype))
        weights = _op_weights(point, device, dtype)
        return Subject(
            lambda x: casa_attention(x, weights, backend=backend),
            _op_input(point, device, dtype),
            tuple(weights),
        )

    return subject


def _compile_subject(point: Point, device: str, dtype: torch.dtype) -> Subject:
    from casa_kernels import reference

    torch._dynamo.reset()  # every point compiles afresh: no recompile limit, no stale guards
    if point.model_level:
        model = _casa_model(point, "reference", device, dtype)
        compiled = torch.compile(model, dynamic=False)
        return _module_subject(model, _model_input(point, device, dtype), compiled)
    weights = _op_weights(point, device, dtype)
    compiled = torch.compile(reference.score_attention, dynamic=False)
    return Subject(lambda x: compiled(x, weights), _op_input(point, device, dtype), tuple(weights))


def _full_subject(implementation: str):
    def subject(point: Point, device: str, dtype: torch.dtype) -> Subject:
        torch.manual_seed(0)
        if point.model_level:
            model = ITransformerModel(
                n_vars=point.n_vars,
                d_model=point.d_model,
                seq_len=point.seq_len,
                pred_len=point.pred_len,
                e_layers=point.e_layers,
                n_heads=N_HEADS,
                implementation=implementation,
            )
            x = _model_input(point, device, dtype)
        else:
            model = FullAttention(
                d_model=point.d_model, n_heads=N_HEADS, implementation=implementation
            )
            x = _op_input(point, device, dtype)
        model = model.to(device=device, dtype=dtype).train(point.training)
        return _module_subject(model, x)

    return subject


def _measured(subject_of: Callable[[Point, str, torch.dtype], Subject]):
    """A provider's ``build``: the forward of its subject, or at a training point the op's
    forward+backward or the forecaster's training step (:mod:`bench.training`)."""

    def build(point: Point, device: str, dtype: torch.dtype) -> Callable[[], object]:
        subject = subject_of(point, device, dtype)
        if not point.training:
            return lambda: subject.run(subject.x)
        if point.model_level:
            target = torch.randn(
                point.batch, point.pred_len, point.n_vars, generator=_seeded(point, 1)
            )
            return training.training_step(subject, target.to(device=device, dtype=dtype))
        # The op (CASA or full attention) maps [B, N, D] to [B, N, D].
        grad_output = torch.randn(subject.x.shape, generator=_seeded(point, 1))
        return training.forward_backward(subject, grad_output.to(device=device, dtype=dtype))

    return build


def _backend_unavailable(backend: str):
    def unavailable(device: str, dtype: torch.dtype) -> str | None:
        reason = registry.get_backend(backend).reason_not_serving(torch.device(device), dtype)
        device_type = torch.device(device).type
        if reason is None and backend not in registry.auto_order(device_type):
            reason = (
                f"backend='auto' never picks {backend} on {device_type} devices (its auto_priority), "
                "so it is not benchmarked there"
            )
        return reason

    return unavailable


def _compile_unavailable(device: str, dtype: torch.dtype) -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile is not available in this torch"
    return None


def _always(device: str, dtype: torch.dtype) -> str | None:
    return None


def _casa_provider(backend: str) -> Provider:
    return Provider(
        f"casa-{backend}",
        "casa",
        _measured(_casa_subject(backend)),
        _backend_unavailable(backend),
        _casa_estimate,
    )


GEMM_PEAK_SIZE = 2048


def _gemm_peak(point: Point, device: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    a, b = (
        torch.randn(GEMM_PEAK_SIZE, GEMM_PEAK_SIZE, generator=_seeded(point, stream)).to(
            device=device, dtype=dtype
        )
        for stream in (0, 1)
    )
    return lambda: torch.mm(a, b)


def _gemm_peak_unavailable(device: str, dtype: torch.dtype) -> str | None:
    from casa_kernels.ops.backends import cpu

    if (
        torch.device(device).type == "cpu"
        and dtype == torch.bfloat16
        and cpu.bf16_gemm_tier() == "none"
    ):
        return (
            "this CPU tier has no bfloat16 GEMMs (cpu bfloat16 GEMMs: none): PyTorch's runs "
            "without hardware, and casa-cpu computes bfloat16 in fp32 GEMMs, whose rate is "
            "the float32 row's"
        )
    return None


def _gemm_peak_estimate(point: Point, dtype: torch.dtype) -> int:
    return 3 * GEMM_PEAK_SIZE**2 * torch.tensor([], dtype=dtype).element_size()


def _activation_bytes(point: Point, dtype: torch.dtype, copies: int) -> int:
    width = point.d_model if not point.model_level else max(point.d_model, point.seq_len)
    return (
        copies * point.batch * point.n_vars * width * torch.tensor([], dtype=dtype).element_size()
    )


def _saved_layers(point: Point) -> int:
    """Layers whose activations autograd keeps for the backward (0 for a forward)."""
    if not point.training:
        return 0
    return point.e_layers if point.model_level else 1


def _casa_estimate(point: Point, dtype: torch.dtype) -> int:
    return _activation_bytes(point, dtype, 10 + SAVED_PER_LAYER * _saved_layers(point))


def _einsum_estimate(point: Point, dtype: torch.dtype) -> int:
    scores = point.batch * N_HEADS * point.n_vars**2 * 4  # fp32 [B, H, N, N]
    layers = _saved_layers(point)
    return (EINSUM_SCORE_COPIES + layers) * scores + _activation_bytes(
        point, dtype, 8 + SAVED_PER_LAYER * layers
    )


def _sdpa_estimate(point: Point, dtype: torch.dtype) -> int:
    # Flash / memory-efficient kernels keep no [N, N] tensor; the time cap stops them.
    return _activation_bytes(point, dtype, 8 + SAVED_PER_LAYER * _saved_layers(point))


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        *(_casa_provider(name) for name in casa_kernels.backend_names()),
        Provider(
            "casa-compile",
            "casa",
            _measured(_compile_subject),
            _compile_unavailable,
            _casa_estimate,
        ),
        Provider(
            "full-einsum", "full", _measured(_full_subject("einsum")), _always, _einsum_estimate
        ),
        Provider("full-sdpa", "full", _measured(_full_subject("sdpa")), _always, _sdpa_estimate),
        Provider("gemm-peak", "peak", _gemm_peak, _gemm_peak_unavailable, _gemm_peak_estimate),
    )
}


def select(names: str | None) -> list[Provider]:
    """Providers named in a comma list (when None/empty: all but ``gemm-peak``, a measure of
    the machine); raises on an unknown name."""
    if not names:
        return [p for p in PROVIDERS.values() if p.family != "peak"]
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in PROVIDERS:
            raise SystemExit(
                f"--providers: unknown provider {name!r}; expected some of {', '.join(PROVIDERS)}"
            )
        chosen.append(PROVIDERS[name])
    return chosen
