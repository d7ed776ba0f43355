"""variate_range: contiguous balanced ranges covering the variates, and its errors."""

import pytest

from casa_kernels.distributed import VariateShard, variate_range


@pytest.mark.parametrize("n_vars, world_size", [(7, 2), (8, 3), (3, 3), (862, 5), (1, 1), (100, 7)])
def test_ranges_are_contiguous_balanced_and_cover_every_variate(n_vars, world_size):
    ranges = [variate_range(n_vars, world_size, r) for r in range(world_size)]
    assert ranges[0].start == 0 and ranges[-1].stop == n_vars
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger ranges first


def test_fewer_variates_than_ranks_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"n_vars: expected at least world_size = 4 variates .*received 3"
    ):
        variate_range(3, 4, 0)


@pytest.mark.parametrize("rank", [-1, 2])
def test_rank_outside_the_group_is_an_error(rank):
    with pytest.raises(
        ValueError, match=rf"rank: expected 0 <= rank < world_size = 2, received {rank}"
    ):
        variate_range(5, 2, rank)


def test_non_int_arguments_are_errors():
    with pytest.raises(TypeError, match="world_size: expected an int"):
        variate_range(5, 2.0, 0)
    with pytest.raises(TypeError, match="rank: expected an int"):
        variate_range(5, 2, "0")


def test_a_shard_needs_an_initialised_group():
    with pytest.raises(
        RuntimeError, match="group: expected an initialised torch.distributed process group"
    ):
        VariateShard.of(5)
