"""Runs a function on P spawned processes joined in a gloo group, with timeouts everywhere.

``run_ranks(fn, world_size, *args)`` starts P processes (``spawn``), each with one
torch thread, joins them in a gloo process group through a file store (no port to
pick), calls ``fn(rank, world_size, *args)`` and returns the P results in rank order.
An exception on a rank comes back as :class:`RankError` with its traceback; a rank
that has not answered within ``timeout_s`` is killed and reported, so a bug can never
hang the test run; a rank whose process ends without an answer (a C++ abort, a kill) is
reported as soon as it is seen.

A scenario that ends its group (a failure test) runs in a group of its own,
:func:`fresh_group`, so that one session of processes can run several.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What one collective may wait for before gloo gives up: a backstop far above a healthy run.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)


class RankError(Exception):
    """A rank raised, or did not answer in time; the message holds its traceback."""


def end_current_group() -> None:
    """Ends the default group, if any, once every rank is connected in it (a rank that ended a
    group while a peer was still connecting would fail the peer's connection), or at once if
    it is broken already."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(RuntimeError):
        dist.barrier()
    dist.destroy_process_group()


def fresh_group(
    rank: int, world_size: int, store_path: str, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT
) -> None:
    """Makes a new default gloo group through the file store at ``store_path`` (unused so far),
    ending the current one first; returns when every rank is connected in it."""
    end_current_group()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    dist.barrier()


def _worker(
    rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, results
) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _died_without_answer(procs, answers: dict) -> list[int]:
    return [r for r, p in enumerate(procs) if r not in answers and p.exitcode is not None]


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 120.0) -> list:
    """``[fn(0, P, *args), ..., fn(P-1, P, *args)]``, each computed in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store, fn, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        answers: dict[int, tuple[bool, object]] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        try:
            while len(answers) < world_size:
                left = (deadline - datetime.datetime.now()).total_seconds()
                try:
                    rank, ok, value = results.get(timeout=min(max(left, 0.01), 0.2))
                    answers[rank] = (ok, value)
                    continue
                except queue.Empty:
                    pass
                dead = _died_without_answer(procs, answers)
                while True:  # a process that answered and then ended has its answer queued by now
                    try:
                        rank, ok, value = results.get_nowait()
                    except queue.Empty:
                        break
                    answers[rank] = (ok, value)
                lost = [r for r in dead if r not in answers]
                if lost:
                    codes = [procs[r].exitcode for r in lost]
                    raise RankError(f"ranks {lost} of {world_size} died (exit codes {codes})")
                if left <= 0:
                    missing = sorted(set(range(world_size)) - set(answers))
                    raise RankError(
                        f"ranks {missing} of {world_size} gave no result within {timeout_s} s"
                    )
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    for rank in range(world_size):
        ok, value = answers[rank]
        if not ok:
            raise RankError(f"rank {rank} of {world_size} raised:\n{value}")
    return [answers[r][1] for r in range(world_size)]
