"""Ranks that disagree are caught before they compute, with the same clear error on every rank (P = 2 and 3).

Without the check, a different batch size, D or dtype on one rank makes the layers'
all-reduces differ in size (gloo aborts that process from C++), and a different n_vars or
different replicated weights run to the end with wrong results.
"""

from __future__ import annotations

import pytest

from .agreement_scenarios import session
from .launch import run_ranks

N_VARS = {2: 7, 3: 8}
# what the odd (last) rank does differently -> the fields the error must name
DISAGREEMENTS = {
    "batch size": ["batch size B"],
    "d_model": ["d_model", "replicated weights digest"],
    "dtype": ["input dtype", "parameter dtypes"],
    "n_vars": ["n_vars"],
    "backend": ["backend"],
    "weights": ["replicated weights digest"],
    "grad mode": ["grad enabled"],
    "frozen parameter": ["parameters requiring grad"],
    "attention d_model": ["d_model", "input shape without the variate dim"],
    "direct construction d_model": ["d_model"],  # caught before the replicas' broadcast
}


@pytest.fixture(scope="module", params=sorted(N_VARS), ids=lambda p: f"P{p}")
def ranks(request, tmp_path_factory):
    world_size = request.param
    results = run_ranks(
        session,
        world_size,
        N_VARS[world_size],
        str(tmp_path_factory.mktemp(f"agree-p{world_size}")),
        list(DISAGREEMENTS),
        timeout_s=240,
    )
    return world_size, results


@pytest.mark.parametrize("what", DISAGREEMENTS)
def test_a_disagreeing_rank_is_caught_on_every_rank_before_any_layer_runs(ranks, what):
    world_size, results = ranks
    odd = world_size - 1
    for rank, r in enumerate(result[what] for result in results):
        kind, message = r["error"]
        assert kind == "VariateParallelMismatch", f"rank {rank}: {r}"
        assert "the ranks of the variate-parallel group disagree" in message, message
        for field in DISAGREEMENTS[what]:
            assert f"{field}: rank 0 has" in message and f"rank {odd} has" in message, (
                f"rank {rank}: {field!r} not named in {message}"
            )
        assert r["layer_all_reduces"] == 0, f"rank {rank}: a layer's all-reduce ran first"
        assert r["group_ended"], f"rank {rank}: its process group is still open"


def test_the_batch_size_may_change_between_calls_on_all_ranks(ranks):
    for rank, result in enumerate(results["batch size changes"] for results in ranks[1]):
        assert max(result["errors"]) <= 1e-10, f"rank {rank}: {result}"
