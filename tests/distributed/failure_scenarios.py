"""What each rank runs in the fail-fast tests: training steps in which one rank fails, or dies, in one phase.

A step is forward, loss, backward, ``sync_replicated_grads`` and the optimizer step. On the
failing rank, in its second step, the phase under test calls ``act`` (raise, or kill the
process) a moment after the others have started waiting at a collective. Every rank
reports what it raised and how long after the failure (wall clock, one machine); a
failing rank that lives on waits until the others have reported (or ``LINGER_LIMIT_S``),
its group still open unless the library ended it, so a rank that waited for it would be
seen waiting.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from casa_kernels.distributed import VariateParallelFailure, shard_model, variate_range

from .launch import end_current_group, fresh_group
from .scenarios import problem, single_process_model

PHASES = ("forward", "loss", "backward", "sync", "optimizer step")
FAILING_STEP = 1
STEPS = 3
DELAY_BEFORE_FAILING_S = 0.2  # the other ranks are waiting at their collective by then
LINGER_LIMIT_S = 20.0
UNGUARDED_TIMEOUT = datetime.timedelta(seconds=3)


class InjectedFailure(RuntimeError):
    pass


def _inject(model, optimizer, phase: str, act: Callable[[], None]) -> Callable[[], None]:
    """Arms ``act`` to run in ``phase`` of the next step; returns what runs in the loss phase
    (``act`` for the loss, else nothing). The hooks stay: the step is the last one that runs."""
    blocks = [layer[0] for layer in model.model[2:-1]]
    if phase == "forward":  # between the first and the second layer's all-reduces
        blocks[1].register_forward_pre_hook(lambda module, args: act())
    elif phase == "backward":  # after the last layer's backward all-reduces, before the first's

        def on_first_block_output(module, args, out) -> None:
            out.register_hook(lambda grad: act())

        blocks[0].register_forward_hook(on_first_block_output)
    elif phase == "sync":
        replicated = model._replicated_parameters
        model._replicated_parameters = lambda: (act(), replicated())[1]
    elif phase == "optimizer step":
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: act())
    return act if phase == "loss" else lambda: None


def _training_step(model, optimizer, x_local, w_local, in_loss: Callable[[], None]) -> None:
    y = model(x_local)
    in_loss()
    loss = (y * w_local).sum()
    loss.backward()
    model.sync_replicated_grads()
    optimizer.step()
    optimizer.zero_grad()


def _in_a_child(run: Callable[[], object]) -> dict:
    """Runs ``run`` in a forked child of this process, the rank that is killed (so that this
    process lives on for the next scenario); returns ``{"killed_by": signal or None}``."""
    end_current_group()  # the child makes its own group; none may be open at the fork
    pid = os.fork()
    if pid == 0:
        try:
            run()
        finally:
            os._exit(1)  # it was not killed: the parent reports None
    _, status = os.waitpid(pid, 0)
    return {"killed_by": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}


def phase_failure(
    rank: int,
    world_size: int,
    n_vars: int,
    directory: str,
    phase: str,
    failing_rank: int,
    how: str,
    guarded: bool,
) -> dict:
    """Steps until an error; ``how`` is "raise" or "kill" (SIGKILL) on ``failing_rank`` in ``phase``.

    Returns ``{"error": (type name, message), "after_failure_s": seconds from the failure
    to this rank's error, "step": the step that raised}``; for the killed rank, how its
    process (a child of this one) ended.
    """
    args = (rank, world_size, n_vars, directory, phase, failing_rank, how, guarded)
    if how == "kill" and rank == failing_rank:
        return _in_a_child(lambda: _steps_until_error(*args))
    return _steps_until_error(*args)


def _steps_until_error(
    rank: int,
    world_size: int,
    n_vars: int,
    directory: str,
    phase: str,
    failing_rank: int,
    how: str,
    guarded: bool,
) -> dict:
    name = f"{phase.replace(' ', '-')}-{how}-{'guarded' if guarded else 'unguarded'}"
    timeout = dict(timeout=UNGUARDED_TIMEOUT) if not guarded else {}
    fresh_group(rank, world_size, str(Path(directory) / f"{name}.group"), **timeout)
    coordination = dist.FileStore(str(Path(directory) / f"{name}.coordination"), world_size)
    coordination.set_timeout(datetime.timedelta(seconds=LINGER_LIMIT_S * 2))

    torch.manual_seed(0)
    model = shard_model(single_process_model(n_vars, "reference"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    cols = variate_range(n_vars, world_size, rank)
    x, weights = problem(n_vars)
    x_local, w_local = (t[:, :, cols.start : cols.stop].float() for t in (x, weights))

    def act() -> None:
        time.sleep(DELAY_BEFORE_FAILING_S)
        coordination.set("failed_at", repr(time.time()))
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFailure(f"injected failure in the {phase}")

    error, step = ("", ""), None
    for step in range(STEPS):
        in_loss = (
            _inject(model, optimizer, phase, act)
            if rank == failing_rank and step == FAILING_STEP
            else lambda: None
        )
        try:
            if guarded:
                with model.ends_group_on_failure():
                    _training_step(model, optimizer, x_local, w_local, in_loss)
            else:
                _training_step(model, optimizer, x_local, w_local, in_loss)
        except (VariateParallelFailure, InjectedFailure) as e:
            error = (type(e).__name__, str(e))
            break
    raised_at = time.time()
    failed_at = float(coordination.get("failed_at"))  # waits for the failing rank's stamp
    if rank == failing_rank:  # lives on until the others have their error
        deadline = time.monotonic() + LINGER_LIMIT_S
        while coordination.add("reported", 0) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        coordination.add("reported", 1)
    return {"error": error, "after_failure_s": raised_at - failed_at, "step": step}


def session(rank: int, world_size: int, n_vars: int, directory: str, scenarios: list) -> dict:
    """``{scenario key: result}`` for each ``(phase, failing_rank, how, guarded)`` in turn."""
    return {
        key: phase_failure(rank, world_size, n_vars, directory, *key)
        for key in map(tuple, scenarios)
    }
