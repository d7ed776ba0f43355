"""The distributed benchmark's bookkeeping (no timings asserted): counted bytes, formulas, points, rows."""

import torch

from bench import distributed as bench_distributed
from bench import results
from casa_kernels import CASAModel
from casa_kernels.distributed import shard_model


def test_counted_bytes_are_the_formula_and_do_not_grow_with_n(group_of_one):
    counted_per_n = []
    for n_vars in (3, 30):
        torch.manual_seed(0)
        model = shard_model(
            CASAModel(
                n_vars=n_vars, d_model=16, seq_len=8, pred_len=4, e_layers=3, backend="reference"
            )
        )
        with torch.inference_mode(), bench_distributed.counting_all_reduce() as counted:
            model(torch.randn(2, 8, n_vars))
        counted_per_n.append(counted[0])
    # per layer: h1 [2, 4, 8] + max and sum [2, 16], float32
    assert (
        bench_distributed.casa_allreduce_bytes(2, 16, torch.float32) == (2 * 4 * 8 + 2 * 2 * 16) * 4
    )
    assert counted_per_n == [3 * bench_distributed.casa_allreduce_bytes(2, 16, torch.float32)] * 2
    assert (
        bench_distributed.casa_allreduce_bytes(2, 16, torch.bfloat16)
        == (2 * 4 * 8 + 2 * 2 * 16) * 4
    )
    assert bench_distributed.kv_allgather_bytes(2, 30, 16, torch.bfloat16) == 2 * 2 * 30 * 16 * 2


def test_every_scaled_point_has_its_single_process_counterpart():
    pts = bench_distributed.points(3, 4, quick=True)
    strong = [p for p in pts if p.sweep == "strong"]
    weak = [p for p in pts if p.sweep == "weak"]
    assert [(p.world_size, p.n_vars) for p in strong[:2]] == [(1, 256), (3, 256)]
    assert [(p.world_size, p.n_vars) for p in weak[:2]] == [(1, 128), (3, 384)]


def test_rows_with_new_columns_keep_them(tmp_path):
    path = tmp_path / "distributed.csv"
    row = {c: "" for c in results.KEY_COLUMNS} | {"suite": "distributed", "world_size": 2}
    results.upsert_rows(path, [row])
    assert results.read_rows(path)[0]["world_size"] == "2"
