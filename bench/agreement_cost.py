"""``torchrun --nproc-per-node P -m bench.agreement_cost``: what the variate-parallel agreement check costs.

Per configuration (the distributed suite's, D = 128, L = H = 96, two layers, and the
tests' small one), on every rank, inference mode:

* the forward with the check, and with ``start_check`` replaced by a no-op on every rank:
  interleaved rounds, each call started after a barrier and timed on the slowest rank;
  medians;
* the check alone (``start_check`` on a prepared descriptor, then awaited), median;
* the one-time digest of the replicated weights (first call), median of a few.

Prints one line per configuration (rank 0); writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from casa_kernels import CASAModel
from casa_kernels.distributed import agreement, shard_model

CONFIGS = {
    "suite (N=1024, D=128, L=H=96, 2 layers, B=4)": dict(
        n_vars=1024, d_model=128, seq_len=96, pred_len=96, e_layers=2, batch=4
    ),
    "tests (N=8, D=16, L=12, H=6, 2 layers, B=2)": dict(
        n_vars=8, d_model=16, seq_len=12, pred_len=6, e_layers=2, batch=2
    ),
}


@contextlib.contextmanager
def check_disabled() -> Iterator[None]:
    real = agreement.start_check
    agreement.start_check = lambda shard, descriptor: lambda: None
    try:
        yield
    finally:
        agreement.start_check = real


def slowest_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one ``fn()`` started after a barrier, the slowest rank's."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    t = torch.tensor([(time.perf_counter() - start) * 1e3], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure(config: dict, backend: str, rounds: int, calls: int) -> dict[str, float]:
    config = dict(config)
    batch = config.pop("batch")
    torch.manual_seed(0)
    model = shard_model(CASAModel(backend=backend, **config).eval())
    x = torch.randn(batch, config["seq_len"], model.shard.n_local)
    with_check, without = [], []
    with torch.inference_mode():
        model(x)
        for _ in range(rounds):
            with_check += [slowest_ms(lambda: model(x)) for _ in range(calls)]
            with check_disabled():
                without += [slowest_ms(lambda: model(x)) for _ in range(calls)]
        descriptor = model._call_descriptor(x, 2)
        check = [
            slowest_ms(lambda: agreement.start_check(model.shard, descriptor)())
            for _ in range(rounds * calls)
        ]
        digest = [
            slowest_ms(lambda: agreement.replicated_digest(model._named_replicated_parameters()))
            for _ in range(5)
        ]
    return {
        "forward_ms": statistics.median(with_check),
        "forward_unchecked_ms": statistics.median(without),
        "check_ms": statistics.median(check),
        "digest_ms": statistics.median(digest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        for name, config in CONFIGS.items():
            r = measure(config, args.backend, args.rounds, args.calls)
            if dist.get_rank() == 0:
                print(
                    f"P={dist.get_world_size()} {args.backend} {name}: forward "
                    f"{r['forward_ms']:.3f} ms with the check, {r['forward_unchecked_ms']:.3f} ms "
                    f"without; the check alone {r['check_ms']:.3f} ms; the one-time digest "
                    f"{r['digest_ms']:.3f} ms",
                    flush=True,
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
