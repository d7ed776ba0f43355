"""Variate-parallel CASA on P = 2 and 3 spawned processes (gloo, CPU) against the single-process model.

One session of P processes per P runs every scenario (tests/distributed/scenarios.py)
and the tests below assert on what each rank reported. N is ragged (not a multiple of P).
"""

from __future__ import annotations

import pytest

from .launch import run_ranks
from .scenarios import CONFIG, FAILED_RANK_LINGERS_S, NEEDS_SUBSETS, session

N_VARS = {2: 7, 3: 8}  # ragged: 4+3 and 3+3+2 variates
FAILING_RANK = 1
BACKENDS = ("reference", "standin", "cpu")
DTYPES = ("float64", "float32")


@pytest.fixture(scope="module", params=sorted(N_VARS), ids=lambda p: f"P{p}")
def ranks(request, tmp_path_factory):
    """``(P, [rank 0's results, ..., rank P-1's])`` of one session of every scenario."""
    world_size = request.param
    tmp = tmp_path_factory.mktemp(f"p{world_size}")
    results = run_ranks(
        session,
        world_size,
        N_VARS[world_size],
        list(BACKENDS),
        str(tmp),
        FAILING_RANK,
        timeout_s=150,
    )
    return world_size, results


def scenario(ranks, name: str) -> list:
    """Each rank's result of scenario ``name``; fails with the rank's traceback if it raised."""
    world_size, results = ranks
    per_rank = [r[name] for r in results]
    for rank, result in enumerate(per_rank):
        if isinstance(result, str) and result.startswith("error: "):
            pytest.fail(f"rank {rank} of {world_size}, scenario {name}:\n{result}")
    return per_rank


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_equals_single_process_columns(ranks, backend, dtype):
    """fp64 within 1e-10, fp32 within the fixed fp32 rule of casa_kernels.tolerance, of the float64 model."""
    for rank, result in enumerate(scenario(ranks, f"model/{backend}/{dtype}")):
        max_abs, excess = result["output"]
        assert excess <= 0, (
            f"rank {rank}: output off the single-process float64 model by {max_abs:.3g}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_equal_single_process(ranks, backend, dtype):
    """After backward and sync_replicated_grads: input and every parameter's gradient (slices for sharded)."""
    for rank, result in enumerate(scenario(ranks, f"model/{backend}/{dtype}")):
        assert result["grad_shapes_ok"], (
            f"rank {rank}: a gradient is missing or has the wrong shape"
        )
        name, max_abs, excess = result["grad_worst"]
        assert excess <= 0, (
            f"rank {rank}: gradient of {name} off the single-process float64 one by {max_abs:.3g}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_backward_runs_the_backends_own_backward_of_its_stages(ranks, backend, dtype):
    """The cpu backend: every layer's backward on its own backward of the stages and no stage
    differentiated from the reference; the standin (stages without one): the reference's
    gradients; the reference: plain autograd."""
    expected = {
        "cpu": lambda paths: paths == {"fused": CONFIG["e_layers"], "reference": 0},
        "standin": lambda paths: paths["fused"] == 0 and paths["reference"] > 0,
        "reference": lambda paths: paths == {"fused": 0, "reference": 0},
    }[backend]
    for rank, result in enumerate(scenario(ranks, f"model/{backend}/{dtype}")):
        assert expected(result["backward_paths"]), f"rank {rank}: {result['backward_paths']}"


@pytest.mark.parametrize("case", sorted(NEEDS_SUBSETS))
def test_a_subset_of_gradients_on_the_cpu_backends_own_backward(ranks, case):
    """x and a subset of the attention's weights need a gradient: exactly those get one, equal
    (float64, within 1e-10) to the single-process reference's, on the backend's own backward."""
    wanted = sorted(NEEDS_SUBSETS[case])
    for rank, results in enumerate(scenario(ranks, "needs_subsets")):
        r = results[case]
        assert r["with_grad"] == wanted, f"rank {rank}: gradients for {r['with_grad']}"
        assert r["max_error"] <= 1e-10, f"rank {rank}: off the reference by {r['max_error']:.3g}"
        assert r["paths"] == {"fused": 1, "reference": 0}, f"rank {rank}: {r['paths']}"


def test_ranks_on_either_backward_path_stay_in_step(ranks):
    """Rank 0 on the reference's gradients, the others on the cpu backend's own backward: the
    all-reduced tensors mean the same on both paths, so the gradients still equal the
    single-process model's (float64)."""
    for rank, result in enumerate(scenario(ranks, "mixed_paths")):
        paths = result["backward_paths"]
        if rank == 0:
            assert paths["fused"] == 0 and paths["reference"] > 0, paths
        else:
            assert paths == {"fused": CONFIG["e_layers"], "reference": 0}, f"rank {rank}: {paths}"
        name, max_abs, excess = result["grad_worst"]
        assert result["grad_shapes_ok"] and excess <= 0, (
            f"rank {rank}: gradient of {name} off the single-process float64 one by {max_abs:.3g}"
        )


def test_official_call_form_gives_the_same_output(ranks):
    for rank, result in enumerate(scenario(ranks, "model/reference/float32")):
        assert result["official_call_equal"], (
            f"rank {rank}: model(x, x_mark, x_dec, x_mark_dec) differs"
        )


def test_shard_model_of_attention_and_block(ranks):
    for rank, errors in enumerate(scenario(ranks, "attention_and_block")):
        for module, error in errors.items():
            assert error <= 1e-10, (
                f"rank {rank}: sharded {module} off the single-process one by {error:.3g}"
            )


def test_a_nan_on_one_rank_gives_the_single_process_nan_pattern(ranks):
    for rank, r in enumerate(scenario(ranks, "nonfinite")):
        assert r["nan_elements"] > 0 and r["same_nan"], f"rank {rank}: NaN pattern differs ({r})"
        assert r["finite_error"] <= 1e-10, (
            f"rank {rank}: finite elements off by {r['finite_error']:.3g}"
        )


def test_built_directly_it_initialises_like_the_single_process_model(ranks):
    """Replicas equal across ranks seeded differently; per-variate parameters within 1/sqrt(N·k)
    (with the local fan-in N_local·k the bound would be sqrt(P) times larger)."""
    for rank, r in enumerate(scenario(ranks, "direct_construction")):
        assert r["replicas_equal"], f"rank {rank}: replicated parameters differ between ranks"
        assert 0.8 < r["max_over_bound"] <= 1.0, f"rank {rank}: {r}"


def test_from_state_dict_holds_only_its_slices(ranks):
    """The checkpoint is memory-mapped; every parameter owns a storage of exactly its size (no view of
    a full tensor); the values are this rank's slices; the load allocates about what the rank holds."""
    world_size, _ = ranks
    for rank, r in enumerate(scenario(ranks, "load")):
        assert r["mmap"] is True and r["file_mapped"], (
            f"rank {rank}: checkpoint not memory-mapped ({r})"
        )
        assert r["own_storage"], f"rank {rank}: a parameter is a view into a larger storage"
        assert r["sharded_shapes_ok"] and r["values_equal"], (
            f"rank {rank}: parameters are not its slices"
        )
        # held: this rank's slices + the replicated parameters; the full per-variate tensors are P times its slices
        assert r["held_bytes"] < r["per_variate_full_bytes"] * (1 / world_size + 0.1)
        assert r["peak_allocated"] <= r["held_bytes"] * 1.05 + 65536, (
            f"rank {rank}: loading allocated {r['peak_allocated']} bytes at peak, holds {r['held_bytes']}"
        )


def test_a_rank_failing_mid_forward_ends_the_group_on_every_rank(ranks):
    world_size, _ = ranks
    for rank, r in enumerate(scenario(ranks, "failure")):
        kind, message = r["error"]
        assert kind == "VariateParallelFailure", (
            f"rank {rank}: expected VariateParallelFailure, got {r['error']}"
        )
        if rank == FAILING_RANK:
            assert (
                f"rank {rank} of {world_size}" in message
                and "injected failure in tail_stats" in message
            )
            assert "process group was ended" in message
        else:
            assert "the all-reduce of the softmax column maxima failed" in message
            assert "another rank failed or left the process group" in message
        assert r["group_ended"], f"rank {rank}: its process group is still initialised"
        # faster than the failing rank's exit (it lingers) and than the 30 s collective timeout
        assert r["seconds"] < FAILED_RANK_LINGERS_S * 0.75, (
            f"rank {rank}: took {r['seconds']:.1f} s to fail"
        )
