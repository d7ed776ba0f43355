"""Variate-parallel CASA modules: each rank holds its variates' slices of the per-variate parameters.

:class:`VariateParallelCASAAttention`, :class:`VariateParallelCASABlock` and
:class:`VariateParallelCASAModel` are the single-process modules of
:mod:`casa_kernels.modules` built for this rank's ``N_local`` variates (so that the
per-variate parameters have exactly the shapes of their slices, under the official
names) with the attention replaced by :func:`variate_parallel_attention`. Everything
else in CASA is per variate (the model's instance normalisation is over time, the
embedding, MLP, LayerNorm and head act on each variate's row) and runs locally.

Built directly (not from a checkpoint or :func:`shard_model`), a module draws its
per-variate parameters (and the first conv's bias) as the single-process module does,
uniform in ±1/sqrt(N·k) with N all the variates, and takes every replicated parameter
from the group's first rank, so that the replicas agree whatever each rank's RNG state
(after checking that the ranks' configurations agree).

Training: the all-reduces carry gradients, so after ``backward`` the per-variate
parameters' gradients are the slices of the single-process gradients; the replicated
parameters' gradients are this rank's share until :meth:`sync_replicated_grads` sums
them over the ranks.

Every outermost call first checks that the ranks agree (:mod:`.agreement`), and a failure
on one rank ends every rank (:mod:`.failure`); the caller's own code of a training step
belongs under :meth:`VariateParallel.ends_group_on_failure`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..modules import CASAAttention, CASABlock, CASAModel
from ..ops.registry import Backend, resolve_backend
from ..validation import check_series, check_tokens
from . import failure
from .agreement import (
    agreed_call,
    call_descriptor,
    construction_descriptor,
    replicated_digest,
    start_check,
)
from .attention import variate_parallel_attention
from .collectives import all_reduce_, broadcast_from_first_
from .partition import VariateShard
from .sharding import load_state_dict_file, local_state_dict, model_config, variate_dim

_building_parts = contextvars.ContextVar("casa_variate_parallel_parts", default=False)


@contextlib.contextmanager
def _parts() -> Iterator[None]:
    """Marks the construction of a variate-parallel module's parts: they leave initialisation to it."""
    token = _building_parts.set(True)
    try:
        yield
    finally:
        _building_parts.reset(token)


def _by_kind(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by (dtype, device), for one flat buffer per group."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


class VariateParallel(nn.Module):
    """What the variate-parallel modules share: the rank's :class:`VariateShard`, the
    initialisation of a directly built module, the agreement check and failure guard of a
    call, and the gradient sync."""

    shard: VariateShard

    def _named_replicated_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if variate_dim(name) is None]

    def _replicated_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._named_replicated_parameters()]

    def _check_input(self, x: torch.Tensor) -> None:
        """Raises the argument error for a forward input this rank cannot take (sizes only)."""
        raise NotImplementedError

    def _config(self) -> dict[str, int]:
        """``d_model, kernel, seq_len, pred_len, e_layers`` (0 where the module has none)."""
        raise NotImplementedError

    def _static_fields(self) -> dict[str, int | str]:
        """The agreement fields of the module's configuration."""
        return {
            "module": type(self).__name__,
            "n_vars": self.shard.n_vars,
            "world_size": self.shard.world_size,
            **self._config(),
        }

    @staticmethod
    def _parameter_fields(params: list[nn.Parameter]) -> dict[str, str]:
        """The agreement fields of the parameters: their dtypes and ``requires_grad`` pattern."""
        return {
            "parameter dtypes": ",".join(sorted({str(p.dtype) for p in params})),
            "parameters requiring grad": "".join("1" if p.requires_grad else "0" for p in params),
        }

    def _first_attention(self) -> VariateParallelCASAAttention:
        return next(m for m in self.modules() if isinstance(m, VariateParallelCASAAttention))

    def _agreement_basis(
        self,
    ) -> tuple[dict[str, int | str], list[nn.Parameter], VariateParallelCASAAttention]:
        """What the agreement descriptor is made of, fixed at the module's first call: the fields
        that do not change (configuration, digest of the replicated weights), the parameters
        (their dtypes and ``requires_grad`` are read on every call) and the attention whose
        backend runs."""
        basis = self.__dict__.get("_agreement_basis_of_first_call")
        if basis is None:
            static = {
                **self._static_fields(),
                "replicated weights digest": replicated_digest(self._named_replicated_parameters()),
            }
            basis = (static, list(self.parameters()), self._first_attention())
            self._agreement_basis_of_first_call = basis
        return basis

    def _call_descriptor(self, x: torch.Tensor, variate_dim_of_x: int) -> dict:
        """This rank's agreement descriptor for a call on ``x`` (checked locally first)."""
        self._check_input(x)
        static, params, attention = self._agreement_basis()
        return call_descriptor(
            {**static, **self._parameter_fields(params), "training": self.training},
            attention.backend,
            x,
            variate_dim_of_x,
        )

    def _construction_descriptor(self) -> dict:
        """This rank's agreement descriptor before its replicated weights are made equal."""
        params = list(self.parameters())
        return construction_descriptor(
            {
                **self._static_fields(),
                **self._parameter_fields(params),
                "backend": self._first_attention().backend,
                "device type": params[0].device.type,
            }
        )

    @contextlib.contextmanager
    def _collective_call(self, x: torch.Tensor, variate_dim_of_x: int) -> Iterator[None]:
        """The body of a forward on ``x`` (its variates along ``variate_dim_of_x``): on the
        outermost call, ``x`` checked and the ranks' agreement checked first; any failure
        ends the group on every rank."""
        with failure.ends_group_on_failure(self.shard, f"{type(self).__name__}.forward"):
            with agreed_call(self.shard, lambda: self._call_descriptor(x, variate_dim_of_x)):
                yield

    def ends_group_on_failure(
        self, what: str = "the training step"
    ) -> contextlib.AbstractContextManager[None]:
        """A guard for this rank's own code between the module's calls: the loss, ``backward``,
        the optimizer step. On any exception in the body it ends the rank's process group,
        so that the other ranks' next collective fails at once instead of waiting for the
        group's timeout, and raises :class:`VariateParallelFailure` (``what`` names the body
        in the message). Use it around the whole training step, on every rank::

            with model.ends_group_on_failure():
                loss_fn(model(x_local), y_local).backward()
                model.sync_replicated_grads()
                optimizer.step()
        """
        return failure.ends_group_on_failure(self.shard, what)

    def _finish_init(self) -> None:
        """Initialises the module as described in the module docstring, unless it is a part of a
        larger variate-parallel module (which does it) or on the meta device (loaded next).
        The ranks' configurations are checked first (the broadcast's sizes depend on them)."""
        if _building_parts.get() or any(p.is_meta for p in self.parameters()):
            return
        with (
            failure.ends_group_on_failure(self.shard, f"{type(self).__name__}.__init__"),
            torch.no_grad(),
        ):
            start_check(self.shard, self._construction_descriptor())()
            for m in self.modules():
                if isinstance(m, VariateParallelCASAAttention):
                    bound = (m.shard.n_vars * m.kernel) ** -0.5
                    enc0, dec2 = m.score.encoder[0], m.score.decoder[4]
                    for t in (enc0.weight, enc0.bias, dec2.weight, dec2.bias):
                        t.uniform_(-bound, bound)
            for group in _by_kind(self._replicated_parameters()):
                flat = broadcast_from_first_(
                    torch.cat([p.reshape(-1) for p in group]),
                    self.shard,
                    "the replicated parameters",
                )
                for p, value in zip(group, flat.split([p.numel() for p in group])):
                    p.copy_(value.view_as(p))

    def sync_replicated_grads(self) -> None:
        """Sums the replicated parameters' gradients over the ranks (one all-reduce per dtype).

        Call after ``backward`` on every rank; a replicated parameter without a gradient
        counts as zero. Per-variate parameters are left as they are (already exact). A
        failure ends the group on every rank, as a forward's does.
        """
        with failure.ends_group_on_failure(
            self.shard, f"{type(self).__name__}.sync_replicated_grads"
        ):
            for group in _by_kind([p for p in self._replicated_parameters() if p.requires_grad]):
                flat = torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                        for p in group
                    ]
                )
                all_reduce_(
                    flat, dist.ReduceOp.SUM, self.shard, "the replicated parameters' gradients"
                )
                for p, g in zip(group, flat.split([p.numel() for p in group])):
                    p.grad = g.view_as(p)


class VariateParallelCASAAttention(VariateParallel, CASAAttention):
    """:class:`~casa_kernels.CASAAttention` over all ranks' variates; this rank holds ``N_local`` of them.

    ``n_vars`` is the whole model's variate count; ``group`` the process group (None:
    the default one), initialised before. ``forward(x_local: [B, N_local, D]) -> [B, N_local, D]``,
    the single-process attention's rows of this rank's variates (``self.shard.variates``).
    """

    def __init__(
        self,
        *,
        n_vars: int,
        d_model: int,
        kernel: int = 3,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
    ):
        shard = VariateShard.of(n_vars, group)
        super().__init__(n_vars=shard.n_local, d_model=d_model, kernel=kernel, backend=backend)
        self.shard = shard
        self._finish_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._collective_call(x, variate_dim_of_x=1):
            return self.attend(x)[0]

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, Backend]:
        """The variate-parallel attention and the backend whose stages ran it (a block's
        fused epilogue, per row, is the same on a rank's rows)."""
        y = variate_parallel_attention(x, self.weights(), self.shard, backend=self.backend)
        return y, resolve_backend(self.backend, x.device, y.dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        check_tokens(x, self.n_vars, self.d_model)

    def _config(self) -> dict[str, int]:
        return dict(d_model=self.d_model, kernel=self.kernel, seq_len=0, pred_len=0, e_layers=0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.shard.describe()}"


class VariateParallelCASABlock(CASABlock, VariateParallelCASAAttention):
    """:class:`~casa_kernels.CASABlock` whose attention is :class:`VariateParallelCASAAttention`.

    ``n_vars`` is the whole model's variate count; ``group`` the process group (None: the
    default one). ``forward(x_local: [B, N_local, D], ...) -> [B, N_local, D]`` (arguments as
    CASABlock's).
    """

    def __init__(
        self,
        *,
        n_vars: int,
        d_model: int,
        kernel: int = 3,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
    ):
        with _parts():
            super().__init__(
                n_vars=n_vars, d_model=d_model, kernel=kernel, backend=backend, group=group
            )
        self._finish_init()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with self._collective_call(x, variate_dim_of_x=1):
            return super().forward(x, *args, **kwargs)


class VariateParallelCASAModel(VariateParallel, CASAModel):
    """:class:`~casa_kernels.CASAModel` with :class:`VariateParallelCASABlock` layers.

    ``forward(x_local: [B, seq_len, N_local]) -> [B, pred_len, N_local]``, the
    single-process model's columns of this rank's variates; the official call
    ``model(x_enc, x_mark_enc, x_dec, x_mark_dec, mask=None)`` works (only ``x_enc`` is used).
    ``n_vars`` is the whole model's variate count; ``self.n_vars`` is ``N_local``.
    """

    block_type = VariateParallelCASABlock

    def __init__(
        self,
        *,
        n_vars: int,
        d_model: int,
        kernel: int = 3,
        seq_len: int,
        pred_len: int,
        e_layers: int,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
    ):
        with _parts():
            super().__init__(
                n_vars=n_vars,
                d_model=d_model,
                kernel=kernel,
                seq_len=seq_len,
                pred_len=pred_len,
                e_layers=e_layers,
                backend=backend,
                group=group,
            )
        self.shard = VariateShard.of(n_vars, group)
        self.n_vars = self.shard.n_local  # the variates of x_local
        self._finish_init()

    def forward(
        self,
        x_enc: torch.Tensor,
        x_mark_enc: object = None,
        x_dec: object = None,
        x_mark_dec: object = None,
        mask: object = None,
    ) -> torch.Tensor:
        with self._collective_call(x_enc, variate_dim_of_x=2):
            return super().forward(x_enc)

    def _check_input(self, x: torch.Tensor) -> None:
        check_series(x, self.seq_len, self.n_vars)

    def _config(self) -> dict[str, int]:
        attention = self.model[2][0]
        return dict(
            d_model=attention.d_model,
            kernel=attention.kernel,
            seq_len=self.seq_len,
            pred_len=self.pred_len,
            e_layers=len(self.model) - 3,
        )

    @classmethod
    def from_state_dict(
        cls,
        path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> VariateParallelCASAModel:
        """This rank's part of the CASAModel whose (official) state_dict is given.

        The configuration is read from the tensors' shapes. A path is memory-mapped
        (``torch.load(mmap=True)``): only this rank's slices of the per-variate tensors are
        read from it, into storage of their own. ``device``: where the parameters go
        (default: where the state_dict's tensors are).
        """
        if isinstance(path_or_dict, (str, os.PathLike)):
            state_dict = load_state_dict_file(path_or_dict)
        elif isinstance(path_or_dict, Mapping):
            state_dict = path_or_dict
        else:
            raise TypeError(
                f"path_or_dict: expected a path (str or os.PathLike) or a state_dict mapping, "
                f"received {type(path_or_dict).__name__}"
            )
        return _build(
            cls, {**model_config(state_dict), "backend": backend}, state_dict, group, device
        )


def _build(
    cls: type[VariateParallel],
    config: dict,
    state_dict: Mapping[str, torch.Tensor],
    group: dist.ProcessGroup | None,
    device: torch.device | str | None,
) -> VariateParallel:
    """``cls(**config, group=group)`` holding this rank's part of ``state_dict`` (no other init)."""
    with torch.device("meta"):
        module = cls(**config, group=group)
    module.load_state_dict(
        local_state_dict(state_dict, module.shard, device), strict=True, assign=True
    )
    return module


def shard_model(
    module: CASAAttention | CASAModel, group: dist.ProcessGroup | None = None
) -> VariateParallel:
    """This rank's part of a single-process CASAModel, CASABlock or CASAAttention (same mode, backend, device).

    Every rank calls it with the same module (e.g. built from the same seed or checkpoint).
    """
    if isinstance(module, VariateParallel):
        raise TypeError(
            f"module: expected a single-process CASA module, received {type(module).__name__} "
            f"(already variate-parallel)"
        )
    if isinstance(module, CASAModel):
        block = module.model[2][0]
        sharded = VariateParallelCASAModel.from_state_dict(
            module.state_dict(), backend=block.backend, group=group
        )
    elif isinstance(module, CASAAttention):
        cls = (
            VariateParallelCASABlock
            if isinstance(module, CASABlock)
            else VariateParallelCASAAttention
        )
        config = dict(
            n_vars=module.n_vars,
            d_model=module.d_model,
            kernel=module.kernel,
            backend=module.backend,
        )
        sharded = _build(cls, config, module.state_dict(), group, None)
    else:
        raise TypeError(
            f"module: expected a CASAModel, CASABlock or CASAAttention, received {type(module).__name__}"
        )
    return sharded.train(module.training)
