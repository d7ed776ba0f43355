"""The two reductions over variates of a variate-parallel CASA layer, as autograd-aware all-reduces.

* :func:`all_reduce_sum` — the sum over ranks, differentiable: its backward all-reduces
  (sums) the incoming gradient, since every rank's copy of the sum feeds its own part of
  the loss and the loss is the sum of the ranks' parts.
* :func:`merge_stats` — the softmax column statistics of all ranks merged with the
  log-sum-exp rule: ``M = max_r m_r`` (all-reduce max) and ``S = Σ_r s_r · exp(m_r − M)``
  (all-reduce sum). The softmax ``exp(s − M) / S`` does not depend on the shift M, so M
  carries no gradient (it is computed from detached maxima); the gradient of S, through
  ``s_r`` and ``m_r``, is derived by autograd from the differentiable sum.

A failed collective ends this rank's process group (so that a third rank waiting on this
one fails too) and raises :class:`~casa_kernels.distributed.failure.VariateParallelFailure`
naming the reduction, or its subclass ``VariateParallelTimeout`` when the group's timeout
passed; a collective called after the group was ended raises at once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from .failure import collective_failure, end_group, ended_group_failure, group_is_open
from .partition import VariateShard

_before_next_collective: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "casa_variate_parallel_before_next_collective", default=None
)


@contextlib.contextmanager
def before_next_collective(settle: Callable[[], None]) -> Iterator[None]:
    """Runs the body with ``settle()`` called just before its first :func:`collective` (the
    agreement check's result is awaited there, after the local work that precedes it)."""
    token = _before_next_collective.set(settle)
    try:
        yield
    finally:
        _before_next_collective.reset(token)


def collective(call: Callable[[], object], shard: VariateShard, what: str) -> None:
    """Runs ``call``, a collective ``what`` over ``shard.group``; a failure ends the group and
    raises :class:`~casa_kernels.distributed.failure.VariateParallelFailure`."""
    settle = _before_next_collective.get()
    if settle is not None:
        _before_next_collective.set(None)
        settle()
    if not group_is_open(shard):
        raise ended_group_failure(shard, what)
    try:
        call()
    except Exception as error:
        end_group(shard)
        raise collective_failure(error, shard, what) from error


def all_reduce_(
    tensor: torch.Tensor, op: dist.ReduceOp, shard: VariateShard, what: str
) -> torch.Tensor:
    """All-reduces the contiguous ``tensor`` in place over ``shard.group`` (no autograd); returns it."""
    collective(
        lambda: dist.all_reduce(tensor, op=op, group=shard.group), shard, f"all-reduce of {what}"
    )
    return tensor


def broadcast_from_first_(tensor: torch.Tensor, shard: VariateShard, what: str) -> torch.Tensor:
    """Overwrites the contiguous ``tensor`` with the group's first rank's, in place; returns it."""
    first = 0 if shard.group is None else dist.get_global_rank(shard.group, 0)
    collective(
        lambda: dist.broadcast(tensor, src=first, group=shard.group), shard, f"broadcast of {what}"
    )
    return tensor


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, shard: VariateShard, what: str) -> torch.Tensor:
        ctx.shard, ctx.what = shard, what
        return all_reduce_(
            tensor.clone(memory_format=torch.contiguous_format), dist.ReduceOp.SUM, shard, what
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = all_reduce_(
            grad.clone(memory_format=torch.contiguous_format),
            dist.ReduceOp.SUM,
            ctx.shard,
            f"the gradient of {ctx.what}",
        )
        return summed, None, None


def all_reduce_sum(tensor: torch.Tensor, shard: VariateShard, what: str) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the ranks (a new tensor); differentiable."""
    return _AllReduceSum.apply(tensor, shard, what)


def all_reduce_max(tensor: torch.Tensor, shard: VariateShard, what: str) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over the ranks (a new tensor, no gradient)."""
    return all_reduce_(
        tensor.detach().clone(memory_format=torch.contiguous_format), dist.ReduceOp.MAX, shard, what
    )


def merge_stats(
    col_max: torch.Tensor, col_sum: torch.Tensor, shard: VariateShard
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global column statistics ``(M, S)``, each ``[B, D]``, from this rank's ``(m_r, s_r)``."""
    global_max = all_reduce_max(col_max, shard, "the softmax column maxima")
    return global_max, all_reduce_sum(
        col_sum * torch.exp(col_max - global_max), shard, "the softmax column sums"
    )
