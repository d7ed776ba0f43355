"""The variate-parallel modules in a group of one process (in this process): equal to the
single-process modules, and their argument errors."""

import pytest
import torch
import torch.distributed as dist

from casa_kernels import CASAAttention, CASAModel
from casa_kernels.distributed import (
    VariateParallelCASAModel,
    VariateParallelFailure,
    shard_model,
)


def _model(n_vars=5):
    torch.manual_seed(0)
    return CASAModel(
        n_vars=n_vars, d_model=16, seq_len=12, pred_len=4, e_layers=2, backend="reference"
    ).double()


def test_one_rank_is_the_single_process_model(group_of_one):
    full = _model()
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    sharded = shard_model(full)
    assert sorted(sharded.state_dict()) == sorted(full.state_dict())
    torch.testing.assert_close(sharded(x), full(x), rtol=1e-12, atol=1e-12)


def test_from_state_dict_reads_the_configuration_from_the_shapes(group_of_one, tmp_path):
    full = _model(n_vars=6)
    torch.save(full.state_dict(), tmp_path / "casa.pt")
    loaded = VariateParallelCASAModel.from_state_dict(tmp_path / "casa.pt", backend="reference")
    assert (loaded.n_vars, loaded.seq_len, loaded.pred_len, len(loaded.model) - 3) == (6, 12, 4, 2)
    x = torch.randn(1, 12, 6, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), full(x), rtol=1e-12, atol=1e-12)


def test_wrong_local_input_names_the_argument_and_ends_the_group(group_of_one):
    sharded = shard_model(_model())
    with pytest.raises(
        VariateParallelFailure, match=r"rank 0 of 1 .* ValueError: x: expected n_vars = 5"
    ) as info:
        sharded(torch.randn(2, 12, 4, dtype=torch.float64))
    assert isinstance(info.value.__cause__, ValueError)
    assert not dist.is_initialized()


def test_a_call_after_a_failure_ended_the_group_says_so(group_of_one):
    sharded = shard_model(_model())
    with pytest.raises(VariateParallelFailure):
        sharded(torch.randn(2, 12, 4, dtype=torch.float64))
    with pytest.raises(
        VariateParallelFailure,
        match=r"agreement check\) cannot run on rank 0 of 1 .*: its process group was ended by "
        r"an earlier failure",
    ):
        sharded(torch.randn(2, 12, 5, dtype=torch.float64))


def test_the_callers_guard_ends_the_group_and_names_the_failure(group_of_one):
    sharded = shard_model(_model())
    with pytest.raises(
        VariateParallelFailure,
        match=r"the loss: rank 0 of 1 \(variates 0..4 of 5\) failed with ZeroDivisionError",
    ) as info:
        with sharded.ends_group_on_failure("the loss"):
            sharded(torch.randn(2, 12, 5, dtype=torch.float64))
            raise ZeroDivisionError("in the loss")
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert not dist.is_initialized()


def test_shard_model_rejects_other_modules(group_of_one):
    with pytest.raises(
        TypeError, match="module: expected a CASAModel, CASABlock or CASAAttention, received Linear"
    ):
        shard_model(torch.nn.Linear(2, 2))
    sharded = shard_model(CASAAttention(n_vars=3, d_model=8))
    with pytest.raises(TypeError, match="already variate-parallel"):
        shard_model(sharded)


def test_from_state_dict_errors_name_what_is_wrong(group_of_one):
    state = _model().state_dict()
    with pytest.raises(
        TypeError, match="path_or_dict: expected a path .* or a state_dict mapping, received int"
    ):
        VariateParallelCASAModel.from_state_dict(3)
    del state["model.0.weight"]
    with pytest.raises(ValueError, match="expected the official CASAModel key 'model.0.weight'"):
        VariateParallelCASAModel.from_state_dict(state)
