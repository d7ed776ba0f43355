"""What each rank runs in the spawned-process tests; every function returns plain numbers for the parent to assert on.

The single-process CASAModel is built from the same seed on every rank, so each rank
can compute the whole model's output and gradients and compare its own columns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from casa_kernels import CASAAttention, CASABlock, CASAModel
from casa_kernels.distributed import (
    VariateParallelCASAModel,
    VariateParallelFailure,
    shard_model,
    variate_range,
)
from casa_kernels.distributed import attention as attention_module
from casa_kernels.distributed import stages as stages_module
from casa_kernels.distributed.sharding import variate_dim
from casa_kernels.ops.registry import get_backend, register_backend
from casa_kernels.tolerance import FIXED_TOLERANCE
from casa_kernels.weights import ScoreAttentionWeights

# How long the failing rank lives on after its error, its group still open unless the library ended it.
FAILED_RANK_LINGERS_S = 4.0
CONFIG = dict(d_model=16, kernel=3, seq_len=12, pred_len=6, e_layers=2)
BATCH = 2


def single_process_model(n_vars: int, backend: str, seed: int = 0) -> CASAModel:
    torch.manual_seed(seed)
    return CASAModel(n_vars=n_vars, backend=backend, **CONFIG)


def problem(n_vars: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 input ``[B, L, N]`` and loss weights ``[B, H, N]`` (loss = Σ out · weights)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, CONFIG["seq_len"], n_vars, generator=g, dtype=torch.float64)
    return x, torch.randn(BATCH, CONFIG["pred_len"], n_vars, generator=g, dtype=torch.float64)


def _excess(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """Max abs error and max of ``|err| - (atol + rtol |expected|)`` (<= 0 passes) under the tolerance rule."""
    atol, rtol = FIXED_TOLERANCE[dtype]
    err = (got.detach().double() - expected).abs()
    return err.max().item(), (err - atol - rtol * expected.abs()).max().item()


def forward_and_gradients(
    rank: int, world_size: int, n_vars: int, backend: str, dtype: torch.dtype
) -> dict:
    """The variate-parallel model's output and gradients against the single-process float64 model's."""
    cols = variate_range(n_vars, world_size, rank)
    x, weights = problem(n_vars)
    reference = single_process_model(n_vars, "reference").double()
    x_ref = x.clone().requires_grad_()
    out_ref = reference(x_ref)
    (out_ref * weights).sum().backward()

    model = shard_model(single_process_model(n_vars, backend).to(dtype))
    x_local = x[:, :, cols.start : cols.stop].to(dtype).requires_grad_()
    out = model(x_local)
    official = model(x_local.detach(), None, x_local.detach(), None)
    with backward_paths() as paths:
        (out * weights[:, :, cols.start : cols.stop].to(dtype)).sum().backward()
    model.sync_replicated_grads()

    expected_grads = dict(reference.named_parameters())
    grads = {"x": (x_local.grad, x_ref.grad[:, :, cols.start : cols.stop])}
    for name, p in model.named_parameters():
        full = expected_grads[name].grad
        dim = variate_dim(name)
        grads[name] = (p.grad, full if dim is None else full.narrow(dim, cols.start, len(cols)))
    grad_errors = {name: _excess(got, want, dtype) for name, (got, want) in grads.items()}
    worst = max(grad_errors, key=lambda n: grad_errors[n][1])
    return {
        "output": _excess(out, out_ref.detach()[:, :, cols.start : cols.stop], dtype),
        "official_call_equal": bool(torch.equal(out.detach(), official)),
        "grad_worst": (worst, *grad_errors[worst]),
        "grad_shapes_ok": all(
            got is not None and got.shape == want.shape for got, want in grads.values()
        ),
        "backward_paths": paths,
    }


# The profiler range of the first kernel of the cpu backend's backward of its stages.
FUSED_STAGES_RANGE = "casa::cpu backward tail colsum"


@contextlib.contextmanager
def backward_paths():
    """Counts what the body's backward runs, into the dict it yields (filled on exit):
    ``fused``, the layers whose backward ran on the cpu backend's own backward of its stages;
    ``reference``, the stages whose gradients were taken from the reference recomputed."""
    counts, calls = {}, []
    differentiate = stages_module._reference_gradients

    def counted(*args):
        calls.append(1)
        return differentiate(*args)

    stages_module._reference_gradients = counted
    try:
        with torch.autograd.profiler.profile() as prof:
            yield counts
    finally:
        stages_module._reference_gradients = differentiate
    counts["fused"] = sum(e.name == FUSED_STAGES_RANGE for e in prof.function_events)
    counts["reference"] = len(calls)


def mixed_paths(rank: int, world_size: int, n_vars: int) -> dict:
    """forward_and_gradients on the cpu backend in float64 with rank 0 alone on the reference's
    gradients (the backend's own backward declined there, as for weights it does not serve)."""
    decide = attention_module._runs_fused_backward
    if rank == 0:
        attention_module._runs_fused_backward = lambda *args: False
    try:
        return forward_and_gradients(rank, world_size, n_vars, "cpu", torch.float64)
    finally:
        attention_module._runs_fused_backward = decide


# Which of x and the attention's weights need a gradient, per case of `needs_subsets`.
NEEDS_SUBSETS = {
    "x": ("x",),
    "value": ("value_weight", "value_bias"),
    "head and last conv": ("enc0_weight", "dec2_bias"),
    "bottleneck": ("enc0_bias", "dec1_weight"),
    "x and last conv": ("x", "dec2_weight"),
}


def needs_subsets(rank: int, world_size: int, n_vars: int) -> dict:
    """Per case of NEEDS_SUBSETS, a sharded CASAAttention on the cpu backend (float64) against
    the single-process reference attention: the worst gradient's max abs error (this rank's
    slices; the replicated weights' summed over the ranks), whether exactly the wanted ones
    have a gradient, and the backward's paths."""
    cols = variate_range(n_vars, world_size, rank)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(BATCH, n_vars, CONFIG["d_model"], generator=g, dtype=torch.float64)
    grad_y = torch.randn(BATCH, n_vars, CONFIG["d_model"], generator=g, dtype=torch.float64)
    results = {}
    for case, wanted in NEEDS_SUBSETS.items():
        full, on_cpu = (
            CASAAttention(n_vars=n_vars, d_model=CONFIG["d_model"], backend=b).double()
            for b in ("reference", "cpu")
        )
        on_cpu.load_state_dict(full.state_dict())
        sharded = shard_model(on_cpu)
        for module in (full, sharded):
            for field, p in zip(ScoreAttentionWeights._fields, module.weights()):
                p.requires_grad_(field in wanted)
        x_full = x.clone().requires_grad_("x" in wanted)
        x_local = x[:, cols.start : cols.stop].clone().requires_grad_("x" in wanted)
        torch.autograd.backward(full(x_full), grad_y)
        with backward_paths() as paths:
            torch.autograd.backward(sharded(x_local), grad_y[:, cols.start : cols.stop])
        sharded.sync_replicated_grads()
        x_grad = None if x_full.grad is None else x_full.grad[:, cols.start : cols.stop]
        pairs = {"x": (x_local.grad, x_grad)}
        for field, p, q in zip(ScoreAttentionWeights._fields, sharded.weights(), full.weights()):
            dim = {"enc0_weight": 1, "dec2_weight": 1, "dec2_bias": 0}.get(field)
            want = (
                q.grad
                if dim is None or q.grad is None
                else q.grad.narrow(dim, cols.start, len(cols))
            )
            pairs[field] = (p.grad, want)
        results[case] = {
            "with_grad": sorted(name for name, (got, _) in pairs.items() if got is not None),
            "max_error": max(
                (
                    (got - want).abs().max().item()
                    for got, want in pairs.values()
                    if got is not None and want is not None
                ),
                default=math.inf,
            ),
            "paths": paths,
        }
    return results


def sharded_attention_and_block(rank: int, world_size: int, n_vars: int) -> dict:
    """shard_model of a CASAAttention and a CASABlock: max abs error of this rank's rows (float64)."""
    cols = variate_range(n_vars, world_size, rank)
    x = torch.randn(
        BATCH,
        n_vars,
        CONFIG["d_model"],
        generator=torch.Generator().manual_seed(2),
        dtype=torch.float64,
    )
    errors = {}
    for cls in (CASAAttention, CASABlock):
        torch.manual_seed(0)
        full = cls(n_vars=n_vars, d_model=CONFIG["d_model"], kernel=5, backend="reference").double()
        expected = full(x)[:, cols.start : cols.stop]
        errors[cls.__name__] = (
            (shard_model(full)(x[:, cols.start : cols.stop]) - expected).abs().max().item()
        )
    return errors


def direct_construction(rank: int, world_size: int, n_vars: int) -> dict:
    """VariateParallelCASAModel(...) built with a different RNG seed on each rank: are the replicas
    equal, and are the per-variate parameters within the single-process init bound 1/sqrt(N·k)?"""
    torch.manual_seed(1000 + rank)
    model = VariateParallelCASAModel(n_vars=n_vars, **CONFIG)
    replicated = torch.cat(
        [p.detach().reshape(-1) for n, p in model.named_parameters() if variate_dim(n) is None]
    )
    everyone = [torch.empty_like(replicated) for _ in range(world_size)]
    dist.all_gather(everyone, replicated)
    bound = (n_vars * CONFIG["kernel"]) ** -0.5
    per_variate = [
        p.detach().abs().max().item()
        for n, p in model.named_parameters()
        if variate_dim(n) is not None or n.endswith("score.encoder.0.bias")
    ]
    return {
        "replicas_equal": all(torch.equal(t, replicated) for t in everyone),
        "max_over_bound": max(per_variate) / bound,
    }


def nonfinite_attention(rank: int, world_size: int, n_vars: int) -> dict:
    """A NaN in batch element 1 of the last rank's variates, through a sharded CASAAttention
    (float64): NaN where the single-process attention has it (the encoder's sum over variates
    spreads it to every rank), the finite elements within 1e-10."""
    cols = variate_range(n_vars, world_size, rank)
    x = torch.randn(
        BATCH,
        n_vars,
        CONFIG["d_model"],
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(3),
    )
    x[1, n_vars - 1, 7] = torch.nan
    torch.manual_seed(0)
    full = CASAAttention(n_vars=n_vars, d_model=CONFIG["d_model"], backend="reference").double()
    expected = full(x)[:, cols.start : cols.stop]
    got = shard_model(full)(x[:, cols.start : cols.stop])
    finite = torch.isfinite(expected)
    return {
        "same_nan": torch.equal(got.isnan(), expected.isnan()),
        "nan_elements": int(expected.isnan().sum()),
        "finite_error": (got[finite] - expected[finite]).abs().max().item(),
    }


def allocated_peak_outside_mapping(fn, path: str) -> int:
    """Peak bytes held by the c10 CPU allocator during ``fn()``, the mapping of ``path`` left out.

    ``torch.load(mmap=True)`` maps the checkpoint as one region the profiler reports like an
    allocation of the file's size; its pages come from the file and are read only where touched.
    """
    from torch.profiler import ProfilerActivity, profile

    file_bytes = os.path.getsize(path)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    running = peak = 0
    for event in events:
        if abs(event.nbytes()) != file_bytes:
            running += event.nbytes()
            peak = max(peak, running)
    return peak


def _owns_exactly_its_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def load_from_file(rank: int, world_size: int, n_vars: int, path: str) -> dict:
    """VariateParallelCASAModel.from_state_dict(path): what was mapped, held and allocated."""
    cols = variate_range(n_vars, world_size, rank)
    full = single_process_model(n_vars, "reference")
    if rank == 0:
        torch.save(full.state_dict(), path)
    dist.barrier()

    real_load, seen = torch.load, {}

    def watched_load(*args, **kwargs):
        state = real_load(*args, **kwargs)
        seen["mmap"] = kwargs.get("mmap")
        seen["file_mapped"] = str(Path(path).resolve()) in Path("/proc/self/maps").read_text()
        return state

    torch.load = watched_load
    try:
        model = VariateParallelCASAModel.from_state_dict(path, backend="reference")
    finally:
        torch.load = real_load
    peak = allocated_peak_outside_mapping(
        lambda: VariateParallelCASAModel.from_state_dict(path, backend="reference"), path
    )

    full_params = dict(full.named_parameters())
    sharded_shapes_ok, values_equal = True, True
    for name, p in model.named_parameters():
        dim, want = variate_dim(name), full_params[name].detach()
        if dim is not None:
            want = want.narrow(dim, cols.start, len(cols))
            sharded_shapes_ok &= p.shape[dim] == len(cols)
        values_equal &= torch.equal(p.detach(), want)
    per_variate_full = sum(
        p.numel() * p.element_size()
        for n, p in full.named_parameters()
        if variate_dim(n) is not None
    )
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        **seen,
        "own_storage": all(_owns_exactly_its_storage(p) for p in model.parameters()),
        "sharded_shapes_ok": sharded_shapes_ok,
        "values_equal": values_equal,
        "peak_allocated": peak,
        "held_bytes": held,
        "per_variate_full_bytes": per_variate_full,
    }


def failure_mid_forward(rank: int, world_size: int, n_vars: int, failing_rank: int) -> dict:
    """One rank's tail_stats raises between the two all-reduces of the first layer: what every rank sees."""
    stages = get_backend("reference").stages
    if rank == failing_rank:

        def tail_stats(*args):
            raise RuntimeError("injected failure in tail_stats")

        stages = stages._replace(tail_stats=tail_stats)
    register_backend(
        dataclasses.replace(get_backend("reference"), name="fails-on-one-rank", stages=stages)
    )
    model = shard_model(single_process_model(n_vars, "fails-on-one-rank"))
    cols = variate_range(n_vars, world_size, rank)
    x_local = problem(n_vars)[0][:, :, cols.start : cols.stop].float()
    started = time.perf_counter()
    try:
        model(x_local)
        error = ("", "")
    except VariateParallelFailure as e:
        error = (type(e).__name__, str(e))
    seconds, group_ended = time.perf_counter() - started, not dist.is_initialized()
    if (
        rank == failing_rank
    ):  # a process that caught its error and lives on: the others must not wait for it
        time.sleep(FAILED_RANK_LINGERS_S)
    return {"error": error, "seconds": seconds, "group_ended": group_ended}


def upper_bound_tail_stats(x, h5, dec2_weight, dec2_bias):
    """The reference tail statistics relative to a shift above the column maximum (the cpu
    kernel, for one, shifts by a bound from x): ``(m + 0.75, l·e^-0.75)``, as valid for the merge."""
    col_max, col_sum = get_backend("reference").stages.tail_stats(x, h5, dec2_weight, dec2_bias)
    return col_max + 0.75, col_sum * math.exp(-0.75)


def register_standin() -> None:
    """Registers ``standin``: the reference stages, the statistics shifted above the maximum, under
    another name, so they run as a fused backend's do (gradients from the reference)."""
    reference = get_backend("reference")
    stages = reference.stages._replace(tail_stats=upper_bound_tail_stats)
    register_backend(dataclasses.replace(reference, name="standin", stages=stages))


def session(
    rank: int, world_size: int, n_vars: int, backends: list[str], tmp: str, failing_rank: int
) -> dict:
    """Every scenario in turn on this rank: ``{name: result}`` or ``{name: "error: <traceback>"}``.

    The failure scenario comes last, since it ends the group.
    """
    register_standin()
    scenarios = {
        **{
            f"model/{b}/{str(dt).removeprefix('torch.')}": (forward_and_gradients, (n_vars, b, dt))
            for b in backends
            for dt in (torch.float64, torch.float32)
        },
        "attention_and_block": (sharded_attention_and_block, (n_vars,)),
        "nonfinite": (nonfinite_attention, (n_vars,)),
        "needs_subsets": (needs_subsets, (n_vars,)),
        "mixed_paths": (mixed_paths, (n_vars,)),
        "direct_construction": (direct_construction, (n_vars,)),
        "load": (load_from_file, (max(n_vars, 2000), str(Path(tmp) / "casa.pt"))),
        "failure": (failure_mid_forward, (n_vars, failing_rank)),
    }
    results = {}
    for name, (fn, args) in scenarios.items():
        try:
            results[name] = fn(rank, world_size, *args)
        except Exception:  # noqa: BLE001 - reported per scenario to the parent
            results[name] = "error: " + traceback.format_exc()
    return results
