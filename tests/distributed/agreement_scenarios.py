"""What each rank runs in the agreement tests: one rank built or called differently from the others.

Each scenario runs in a group of its own (a caught disagreement ends the group). The
last rank is the odd one out; every rank reports what it raised, its cause, and how many
of the layers' all-reduces ran before (none may: the disagreement is caught first).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from casa_kernels import CASAAttention, CASAModel
from casa_kernels.distributed import (
    VariateParallelCASAModel,
    VariateParallelFailure,
    collectives,
    shard_model,
    variate_range,
)

from .launch import fresh_group
from .scenarios import CONFIG, problem, single_process_model

N_VARS_OFFSET = 1  # the odd rank's model has this many more variates


def _counting_layer_all_reduces() -> tuple[list[int], contextlib.AbstractContextManager]:
    """A counter of the layers' all-reduces that ran (``collectives.all_reduce_`` returned) and the
    context that counts."""
    count, real = [0], collectives.all_reduce_

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        count[0] += 1
        return result

    @contextlib.contextmanager
    def counting():
        collectives.all_reduce_ = counted
        try:
            yield
        finally:
            collectives.all_reduce_ = real

    return count, counting()


def _model_call(rank: int, world_size: int, n_vars: int, odd: bool, what: str):
    """``(model, x_local, context)`` of this rank for the disagreement ``what`` (the odd rank differs)."""
    n_vars_here = n_vars + N_VARS_OFFSET if odd and what == "n_vars" else n_vars
    backend = "cpu" if odd and what == "backend" else "reference"
    seed = 1 if odd and what == "weights" else 0
    config = dict(CONFIG, d_model=32) if odd and "d_model" in what else CONFIG
    torch.manual_seed(seed)
    if what == "attention d_model":
        d_model = 32 if odd else CONFIG["d_model"]
        full = CASAAttention(n_vars=n_vars, d_model=d_model, backend=backend)
        cols = variate_range(n_vars, world_size, rank)
        x = torch.randn(2, n_vars, d_model, generator=torch.Generator().manual_seed(2))
        return shard_model(full), x[:, cols.start : cols.stop], contextlib.nullcontext()
    if what == "direct construction d_model":  # fails in the constructor
        return VariateParallelCASAModel(n_vars=n_vars, **config), None, contextlib.nullcontext()
    full = CASAModel(n_vars=n_vars_here, backend=backend, **config)
    dtype = torch.float64 if odd and what == "dtype" else torch.float32
    model = shard_model(full.to(dtype))
    if odd and what == "frozen parameter":  # sync_replicated_grads would reduce fewer values
        model.model[-1].weight.requires_grad_(False)
    cols = variate_range(n_vars_here, world_size, rank)
    x = problem(n_vars_here)[0][:, :, cols.start : cols.stop].to(dtype)
    if odd and what == "batch size":
        x = torch.cat([x, x[:1]])
    context = torch.no_grad() if odd and what == "grad mode" else contextlib.nullcontext()
    return model, x, context


def disagreement(rank: int, world_size: int, n_vars: int, directory: str, what: str) -> dict:
    """The odd rank differs in ``what``: ``{"error": (type, message), "group_ended": bool,
    "layer_all_reduces": how many ran}``."""
    fresh_group(rank, world_size, str(Path(directory) / f"{what.replace(' ', '-')}.group"))
    count, counting = _counting_layer_all_reduces()
    error = ("", "")
    with counting:
        try:
            model, x, context = _model_call(rank, world_size, n_vars, rank == world_size - 1, what)
            with context:
                model(x)
        except VariateParallelFailure as e:
            error = (type(e).__name__, str(e))
    return {
        "error": error,
        "group_ended": not dist.is_initialized(),
        "layer_all_reduces": count[0],
    }


def batch_size_changes(rank: int, world_size: int, n_vars: int, directory: str) -> dict:
    """All ranks call with B = 2, then 3, then 2 again (float64): each output's max abs error
    against the single-process model's columns of this rank."""
    fresh_group(rank, world_size, str(Path(directory) / "batch-size-changes.group"))
    full = single_process_model(n_vars, "reference").double()
    model = shard_model(full)
    cols = variate_range(n_vars, world_size, rank)
    x = problem(n_vars)[0]
    errors = []
    for batch in (x, torch.cat([x, x[:1]]), x):
        got = model(batch[:, :, cols.start : cols.stop])
        errors.append((got - full(batch)[:, :, cols.start : cols.stop]).abs().max().item())
    return {"errors": errors}


def session(rank: int, world_size: int, n_vars: int, directory: str, disagreements: list) -> dict:
    """``{"batch size changes": ..., what: disagreement result for what in disagreements}``."""
    results = {"batch size changes": batch_size_changes(rank, world_size, n_vars, directory)}
    for what in disagreements:
        results[what] = disagreement(rank, world_size, n_vars, directory, what)
    return results
