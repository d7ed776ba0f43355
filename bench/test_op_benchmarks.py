"""pytest-benchmark micro-benchmarks of each backend's op (and of full attention, for scale).

Run: ``pytest bench --benchmark-only`` (add ``--benchmark-json out.json`` to keep numbers).
These are timings, not tests: they live outside ``tests/`` (``testpaths = ["tests"]``), so
a plain ``pytest`` never collects them. Each benchmark times one forward of
``casa_attention(x, w, backend=...)`` under ``torch.inference_mode`` on CUDA if present,
else on the CPU; backends that cannot run here are skipped with their reason.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark")

import casa_kernels
from bench.providers import PROVIDERS
from bench.suites import DATASETS
from casa_kernels import ScoreAttentionWeights, casa_attention
from casa_kernels.baselines import FullAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (name, B, N, D): the two ends of the dataset shapes (docs/design.md §8); small enough
# for a 2-core CPU.
SHAPES = [
    (f"{name}-B{batch}", batch, *DATASETS[name][:2])
    for name, batch in (("ETTh1", 16), ("ECL", 1), ("Traffic", 1))
]
ROUNDS = 20 if DEVICE == "cuda" else 5


def _inputs(b: int, n: int, d: int):
    g = torch.Generator().manual_seed(0)
    weights = ScoreAttentionWeights.random(n, d, 3, device=DEVICE, generator=g)
    x = torch.randn(b, n, d, generator=g).to(DEVICE)
    return x, weights


def _run(benchmark, fn):
    def call():
        with torch.inference_mode():
            out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("backend", casa_kernels.backend_names())
def test_casa_op(benchmark, backend, shape):
    name, b, n, d = shape
    reason = PROVIDERS[f"casa-{backend}"].unavailable(DEVICE, torch.float32)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    x, weights = _inputs(b, n, d)
    benchmark.group = name
    benchmark.extra_info.update(device=DEVICE, batch=b, n_vars=n, d_model=d, dtype="float32")
    _run(benchmark, lambda: casa_attention(x, weights, backend=backend))


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("implementation", ["einsum", "sdpa"])
def test_full_attention(benchmark, implementation, shape):
    name, b, n, d = shape
    torch.manual_seed(0)
    layer = FullAttention(d_model=d, n_heads=8, implementation=implementation).to(DEVICE).eval()
    x, _ = _inputs(b, n, d)
    benchmark.group = name
    benchmark.extra_info.update(device=DEVICE, batch=b, n_vars=n, d_model=d, dtype="float32")
    _run(benchmark, lambda: layer(x))
