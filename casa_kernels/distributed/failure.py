"""How a failure on one rank ends every rank of a variate-parallel group promptly.

The ranks of a variate-parallel model meet at every collective: the agreement check and
the layers' all-reduces in the forward, the gradient all-reduces in the backward, and
:meth:`~casa_kernels.distributed.VariateParallel.sync_replicated_grads`. A rank that
raised and went on living (its caller caught the exception) would leave the others
waiting at their next collective until the process group's timeout. So a failure *ends
the rank's process group* (``destroy_process_group``): the other ranks' pending or next
collective then fails at once (their peer closed the connection), they end their groups
in turn and raise :class:`VariateParallelFailure`; the failing rank raises
:class:`VariateParallelFailure` with its own error as the cause.

* Inside the library (forward, the backward's all-reduces, ``sync_replicated_grads``)
  this happens by itself (:func:`ends_group_on_failure`, and every failed collective).
* The caller's own code between those (the loss, the rest of the backward, the optimizer
  step) is covered by running it under the same guard,
  :meth:`~casa_kernels.distributed.VariateParallel.ends_group_on_failure`.
* A rank that dies is seen the same way (its sockets close). A rank that hangs, or that
  fails outside a guard and lives on, is seen only at the group's timeout: the waiting
  ranks raise :class:`VariateParallelTimeout`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch.distributed as dist

from .partition import VariateShard

_inside_guard = contextvars.ContextVar("casa_variate_parallel_guard", default=False)


class VariateParallelFailure(RuntimeError):
    """A variate-parallel computation failed on this rank or on another; the process group has ended."""


class VariateParallelTimeout(VariateParallelFailure):
    """A collective got no answer from the other ranks within the process group's timeout."""


def group_is_open(shard: VariateShard) -> bool:
    """Whether the shard's process group (the default one when ``shard.group`` is None) still exists."""
    if not dist.is_initialized():
        return False
    if shard.group is None:
        return True
    try:
        dist.get_rank(shard.group)
    except ValueError:  # destroyed: no longer registered
        return False
    return True


def end_group(shard: VariateShard) -> None:
    """Destroys the shard's process group (the default group when ``shard.group`` is None)."""
    if not group_is_open(shard):
        return
    try:
        dist.destroy_process_group(shard.group)
    except (RuntimeError, ValueError):  # already torn down: the original failure is what matters
        pass


def _is_timeout(error: Exception) -> bool:
    """Whether a collective's error is its backend's timeout (gloo: "Timed out waiting ...")."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def collective_failure(error: Exception, shard: VariateShard, what: str) -> VariateParallelFailure:
    """The error to raise for ``error`` from a collective ``what`` over the shard's group.

    A timeout is :class:`VariateParallelTimeout`; any other error means that another rank
    failed or left (this rank's own failures end its group before it calls a collective).
    """
    if _is_timeout(error):
        return VariateParallelTimeout(
            f"the {what} timed out on {shard.describe()}: no answer from the other ranks within "
            f"the process group's timeout. A rank is hung or slower than that, or failed and "
            f"lives on without having ended the group (run its code between the model's calls "
            f"under model.ends_group_on_failure()). {type(error).__name__}: {error}"
        )
    return VariateParallelFailure(
        f"the {what} failed on {shard.describe()}: another rank failed or left "
        f"the process group (its own error says why). {type(error).__name__}: {error}"
    )


def ended_group_failure(shard: VariateShard, what: str) -> VariateParallelFailure:
    """The error for a collective ``what`` called after this rank's group was ended."""
    return VariateParallelFailure(
        f"the {what} cannot run on {shard.describe()}: its process group was ended by an "
        f"earlier failure. Start a new process group and build the model again."
    )


@contextlib.contextmanager
def ends_group_on_failure(shard: VariateShard, what: str) -> Iterator[None]:
    """Runs the body; on any exception ends the group and raises :class:`VariateParallelFailure`.

    ``what`` names the computation in the message. Nested uses are transparent: only
    the outermost one (a model around its layers, a training step around the model) acts.
    A :class:`VariateParallelFailure` from inside passes through unchanged.
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
