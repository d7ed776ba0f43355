"""What the benchmarks time: CASA backends, torch.compile of the reference, full attention.

A provider builds, for one benchmark point, a zero-argument callable running the forward
(the op alone for the ``attention``/``scaling`` suites, the whole forecaster for
``model``). Every provider says upfront whether it can run on a device/dtype (a reason
when not) and estimates the memory it needs, so that the runner can skip it instead of
crashing.

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

N_HEADS = 8
# Copies of the [B, H, N, N] score tensor alive at once in the einsum path
# (scores, scaled scores, softmax output).
EINSUM_SCORE_COPIES = 3


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

    @property
    def model_level(self) -> bool:
        return self.seq_len is not None


@dataclass(frozen=True)
class Provider:
    name: str
    family: str  # "casa" or "full"
    build: Callable[[Point, str, torch.dtype], Callable[[], torch.Tensor]]
    unavailable: Callable[[str, torch.dtype], str | None]
    estimate_bytes: Callable[[Point, torch.dtype], int]


def _seeded(point: Point) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * point.n_vars + point.d_model)


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
    return model.to(device=device, dtype=dtype).eval()


def _casa_builder(backend: str):
    def build(point: Point, device: str, dtype: torch.dtype):
        if point.model_level:
            model, x = (
                _casa_model(point, backend, device, dtype),
                _model_input(point, device, dtype),
            )
            return lambda: model(x)
        weights = ScoreAttentionWeights.random(
            point.n_vars,
            point.d_model,
            point.kernel,
            dtype=dtype,
            device=device,
            generator=_seeded(point),
        )
        x = _op_input(point, device, dtype)
        return lambda: casa_attention(x, weights, backend=backend)

    return build


def _compile_builder(point: Point, device: str, dtype: torch.dtype):
    from casa_kernels import reference

    torch._dynamo.reset()  # every point compiles afresh: no recompile limit, no stale guards
    if point.model_level:
        model, x = (
            _casa_model(point, "reference", device, dtype),
            _model_input(point, device, dtype),
        )
        compiled = torch.compile(model, dynamic=False)
        return lambda: compiled(x)
    weights = ScoreAttentionWeights.random(
        point.n_vars,
        point.d_model,
        point.kernel,
        dtype=dtype,
        device=device,
        generator=_seeded(point),
    )
    x = _op_input(point, device, dtype)
    compiled = torch.compile(reference.score_attention, dynamic=False)
    return lambda: compiled(x, weights)


def _full_builder(implementation: str):
    def build(point: Point, device: str, dtype: torch.dtype):
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
        model = model.to(device=device, dtype=dtype).eval()
        return lambda: model(x)

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
        _casa_builder(backend),
        _backend_unavailable(backend),
        _casa_estimate,
    )


def _activation_bytes(point: Point, dtype: torch.dtype, copies: int) -> int:
    width = point.d_model if not point.model_level else max(point.d_model, point.seq_len)
    return (
        copies * point.batch * point.n_vars * width * torch.tensor([], dtype=dtype).element_size()
    )


def _casa_estimate(point: Point, dtype: torch.dtype) -> int:
    return _activation_bytes(point, dtype, 10)


def _einsum_estimate(point: Point, dtype: torch.dtype) -> int:
    scores = point.batch * N_HEADS * point.n_vars**2 * 4  # fp32 [B, H, N, N]
    return EINSUM_SCORE_COPIES * scores + _activation_bytes(point, dtype, 8)


def _sdpa_estimate(point: Point, dtype: torch.dtype) -> int:
    # Flash / memory-efficient kernels keep no [N, N] tensor; the time cap stops them.
    return _activation_bytes(point, dtype, 8)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        *(_casa_provider(name) for name in casa_kernels.backend_names()),
        Provider("casa-compile", "casa", _compile_builder, _compile_unavailable, _casa_estimate),
        Provider("full-einsum", "full", _full_builder("einsum"), _always, _einsum_estimate),
        Provider("full-sdpa", "full", _full_builder("sdpa"), _always, _sdpa_estimate),
    )
}


def select(names: str | None) -> list[Provider]:
    """Providers named in a comma list (all when None/empty); raises on an unknown name."""
    if not names:
        return list(PROVIDERS.values())
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in PROVIDERS:
            raise SystemExit(
                f"--providers: unknown provider {name!r}; expected some of {', '.join(PROVIDERS)}"
            )
        chosen.append(PROVIDERS[name])
    return chosen
