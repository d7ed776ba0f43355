"""Which variates a rank owns: contiguous, balanced ranges over the process group.

Rank ``r`` of ``P`` owns variates ``[start, stop)``; the first ``N mod P`` ranks own
``⌈N/P⌉`` variates, the others ``⌊N/P⌋``, so that rank order is variate order and the
local inputs concatenated over ranks along the variate axis are the whole input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..validation import check_positive_int


def variate_range(n_vars: int, world_size: int, rank: int) -> range:
    """The variates ``range(start, stop)`` that ``rank`` of ``world_size`` owns out of ``n_vars``.

    Raises ``ValueError`` when there are fewer variates than ranks (a rank would own none)
    or ``rank`` is not in ``[0, world_size)``.
    """
    check_positive_int("n_vars", n_vars)
    check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, received {type(rank).__name__} {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, received {rank}")
    if n_vars < world_size:
        raise ValueError(
            f"n_vars: expected at least world_size = {world_size} variates (every rank owns at "
            f"least one), received {n_vars}"
        )
    base, extra = divmod(n_vars, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class VariateShard:
    """One rank's place in a variate-parallel model: the group, its rank and its variates."""

    group: dist.ProcessGroup | None
    """The process group (None: the default group)."""
    rank: int
    world_size: int
    n_vars: int
    """All variates of the model."""
    variates: range
    """The variates this rank owns (contiguous)."""

    @classmethod
    def of(cls, n_vars: int, group: dist.ProcessGroup | None = None) -> VariateShard:
        """This process's shard of ``n_vars`` variates over ``group`` (initialised beforehand)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "group: expected an initialised torch.distributed process group "
                "(torch.distributed.init_process_group), received none"
            )
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError(
                "group: expected a process group this process belongs to, received one it does not"
            )
        return cls(group, rank, world_size, n_vars, variate_range(n_vars, world_size, rank))

    @property
    def n_local(self) -> int:
        """How many variates this rank owns."""
        return len(self.variates)

    def describe(self) -> str:
        """``'rank r of P (variates a..b of N)'``, for messages."""
        return (
            f"rank {self.rank} of {self.world_size} (variates {self.variates.start}.."
            f"{self.variates.stop - 1} of {self.n_vars})"
        )
