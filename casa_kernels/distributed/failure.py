"""What happens when one rank fails inside a variate-parallel forward: the group ends.

The ranks of a variate-parallel model meet at every layer's all-reduces. If one rank
raised and went on living (an exception caught by its caller), the others would wait
at the next all-reduce until the process group's timeout. Instead, the first failure
on a rank ends that rank's process group (``destroy_process_group``): the other ranks'
pending all-reduces fail at once (their peer closed the connection) and raise
:class:`VariateParallelFailure` saying so, and the failing rank raises
:class:`VariateParallelFailure` with its own error as the cause. A rank that dies is
seen the same way; a rank that hangs is caught by the group's timeout.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch.distributed as dist

from .partition import VariateShard

_inside_guard = contextvars.ContextVar("casa_variate_parallel_guard", default=False)


class VariateParallelFailure(RuntimeError):
    """A variate-parallel forward failed on this rank or on another; the process group has ended."""


def end_group(shard: VariateShard) -> None:
    """Destroys the shard's process group (the default group when ``shard.group`` is None)."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group(shard.group)
    except (RuntimeError, ValueError):  # already torn down: the original failure is what matters
        pass


@contextlib.contextmanager
def ends_group_on_failure(shard: VariateShard, what: str) -> Iterator[None]:
    """Runs the body; on any exception ends the group and raises :class:`VariateParallelFailure`.

    ``what`` names the computation in the message. Nested uses are transparent: only
    the outermost one (a model around its layers) acts.
    """
    if _inside_guard.get():
        yield
        return
    token = _inside_guard.set(True)
    try:
        yield
    except VariateParallelFailure:
        end_group(shard)
        raise
    except Exception as error:
        end_group(shard)
        raise VariateParallelFailure(
            f"{what}: {shard.describe()} failed with {type(error).__name__}: {error}. "
            f"Its process group was ended so that the other ranks stop with an error instead of waiting."
        ) from error
    finally:
        _inside_guard.reset(token)
