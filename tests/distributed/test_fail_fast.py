"""A rank that fails or dies in any phase of a training step ends every rank promptly (P = 2 and 3, gloo).

The phases: forward, loss, backward, ``sync_replicated_grads``, optimizer step. The failing
rank raises inside ``model.ends_group_on_failure()`` and lives on, or is killed (SIGKILL; the
rank runs in a forked child of its test process, so that one session covers every phase);
every other rank must raise ``VariateParallelFailure`` within ``BOUND_S`` of the failure,
far below the group's 30 s timeout. Without the guard, a failure the rank survives is seen
only at the group's timeout, and is reported as a timeout.
"""

from __future__ import annotations

import signal

import pytest

from .failure_scenarios import PHASES, UNGUARDED_TIMEOUT, session
from .launch import COLLECTIVE_TIMEOUT, run_ranks

N_VARS = {2: 7, 3: 8}
FAILING_RANK = 1
BOUND_S = 8.0  # generous for a loaded CI machine: 0.01-0.1 s measured on a loaded 2-core one
assert BOUND_S < COLLECTIVE_TIMEOUT.total_seconds() / 3
# where the other ranks wait when the failing rank fails in each phase
WAITING_IN = {
    "forward": "the all-reduce of the encoder head's partial sums",  # the second layer's
    "loss": "the all-reduce of the gradient of the softmax column sums",  # the last layer's
    "backward": "the all-reduce of the gradient of the softmax column sums",  # the first layer's
    "sync": "the all-reduce of the replicated parameters' gradients",
    "optimizer step": "the all-reduce of the call descriptors (the agreement check)",  # next forward
}


@pytest.fixture(scope="module", params=sorted(N_VARS), ids=lambda p: f"P{p}")
def raised(request, tmp_path_factory):
    """``(P, {scenario: [rank 0's result, ...]})``: a guarded failure in each phase, then an unguarded one."""
    world_size = request.param
    scenarios = [(phase, FAILING_RANK, how, True) for how in ("raise", "kill") for phase in PHASES]
    scenarios.append(("loss", FAILING_RANK, "raise", False))
    results = run_ranks(
        session,
        world_size,
        N_VARS[world_size],
        str(tmp_path_factory.mktemp(f"fail-p{world_size}")),
        scenarios,
        timeout_s=240,
    )
    return world_size, {key: [r[key] for r in results] for key in scenarios}


def _assert_others_end_promptly(
    world_size: int, per_rank: list, failing_rank: int, phase: str
) -> None:
    for rank, r in enumerate(per_rank):
        if rank == failing_rank:
            continue
        kind, message = r["error"]
        assert kind == "VariateParallelFailure", f"rank {rank}: {r}"
        assert f"{WAITING_IN[phase]} failed on rank {rank} of {world_size}" in message, message
        assert "another rank failed or left the process group" in message, message
        assert 0 <= r["after_failure_s"] < BOUND_S, (
            f"rank {rank}: ended {r['after_failure_s']:.2f} s after the failure"
        )


@pytest.mark.parametrize("phase", PHASES)
def test_a_rank_failing_in_a_guarded_phase_ends_every_rank_promptly(raised, phase):
    world_size, results = raised
    per_rank = results[(phase, FAILING_RANK, "raise", True)]
    kind, message = per_rank[FAILING_RANK]["error"]
    assert kind == "VariateParallelFailure", per_rank[FAILING_RANK]
    assert f"rank {FAILING_RANK} of {world_size}" in message
    assert f"InjectedFailure: injected failure in the {phase}" in message
    assert "process group was ended" in message
    _assert_others_end_promptly(world_size, per_rank, FAILING_RANK, phase)


def test_an_unguarded_failure_is_seen_at_the_group_timeout_and_reported_as_a_timeout(raised):
    """The failing rank catches its own error outside any guard and lives on: the others wait
    for the group's timeout (3 s here), no longer, and at least one reports a timeout (a third
    rank may see the timed-out rank leave first)."""
    world_size, results = raised
    per_rank = results[("loss", FAILING_RANK, "raise", False)]
    assert per_rank[FAILING_RANK]["error"] == ("InjectedFailure", "injected failure in the loss")
    timeout_s = UNGUARDED_TIMEOUT.total_seconds()
    others = [r for rank, r in enumerate(per_rank) if rank != FAILING_RANK]
    for r in others:
        assert r["error"][0] in ("VariateParallelTimeout", "VariateParallelFailure"), r
        assert r["after_failure_s"] < timeout_s + BOUND_S, r
    timed_out = [r for r in others if r["error"][0] == "VariateParallelTimeout"]
    assert timed_out, others
    for r in timed_out:
        message = r["error"][1]
        assert "timed out on rank" in message and "model.ends_group_on_failure()" in message
        assert "Timed out waiting 3000ms" in message, message  # gloo's, at the group's timeout


@pytest.mark.parametrize("phase", PHASES)
def test_a_rank_killed_in_any_phase_ends_every_other_rank_promptly(raised, phase):
    world_size, results = raised
    per_rank = results[(phase, FAILING_RANK, "kill", True)]
    assert per_rank[FAILING_RANK] == {"killed_by": signal.SIGKILL}
    _assert_others_end_promptly(world_size, per_rank, FAILING_RANK, phase)
