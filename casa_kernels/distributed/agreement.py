"""Ranks that disagree are caught before they compute: one small fixed-size all-reduce per call.

Every rank of a variate-parallel module must run the same configuration (n_vars and so
the variate ranges, world size, D, kernel, the model's L, H and layer count, backend,
parameter dtypes, the replicated weights) on inputs of the same batch size, dtype and
non-variate extent, in the same grad/autocast/train mode. If they do not, the layers'
all-reduces either differ in size (gloo aborts the process from C++; NCCL hangs) or
agree in size and silently mix unrelated numbers.

So the outermost variate-parallel call on each rank reduces a *call descriptor*: K
integers (:data:`FIELDS`, padded to :data:`SLOTS`), each a number or a 56-bit hash of a
string, all-reduced once with MAX over ``[codes, -codes]`` — equal on every rank iff
``max == min`` for every field. The all-reduce has the same size on every rank whatever they disagree on, so it
cannot itself mismatch; it is started as the call begins and awaited just before the
call's first collective, overlapping the local work before it. It runs on every call,
not once per signature: a rank whose batch size alone changed would otherwise run the
check while the others run a layer's all-reduce, exactly the mismatch it is there to
prevent. On disagreement every rank gathers the readable descriptors
(``all_gather_object``) and raises the same :class:`VariateParallelMismatch` naming each
differing field and every rank's value.

The replicated weights enter as a digest (BLAKE2b over their bytes) computed once, at
the module's first call, and cached: later changes to them are not re-checked. A module
built directly runs the check in its constructor too, on the fields known then
(:func:`construction_descriptor`), before broadcasting its replicated parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ..ops.registry import resolve_backend
from .collectives import before_next_collective, collective
from .failure import VariateParallelFailure, ended_group_failure, group_is_open
from .partition import VariateShard

PROTOCOL = 1  # bumped when FIELDS change: ranks on different library versions disagree on it
SLOTS = 32  # the all-reduced codes, FIELDS padded with zeros: the same size in every version

FIELDS = (
    "protocol",
    "module",
    "n_vars",
    "world_size",
    "d_model",
    "kernel",
    "seq_len",
    "pred_len",
    "e_layers",
    "backend",
    "resolved backend",
    "parameter dtypes",
    "parameters requiring grad",
    "replicated weights digest",
    "training",
    "batch size B",
    "input shape without the variate dim",
    "input dtype",
    "device type",
    "grad enabled",
    "autocast",
)

_inside_checked_call = contextvars.ContextVar("casa_variate_parallel_checked_call", default=False)


class VariateParallelMismatch(VariateParallelFailure, ValueError):
    """The ranks of a variate-parallel module disagree on its configuration or on a call's input
    (raised on every rank, whose groups end as for any failure)."""


@functools.lru_cache(maxsize=1024)
def _code(value: int | bool | str) -> int:
    """The field's value as an int64: ints as they are, strings as a 56-bit BLAKE2b hash."""
    if isinstance(value, str):
        return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=7).digest(), "little")
    return int(value)


def replicated_digest(parameters: Iterable[tuple[str, torch.Tensor]]) -> str:
    """BLAKE2b (16 hex digits) over the names, dtypes, shapes and bytes of ``parameters``, in order."""
    digest = hashlib.blake2b(digest_size=8)
    for name, p in parameters:
        digest.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        digest.update(p.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _autocast_state(device_type: str) -> str:
    if not torch.is_autocast_enabled(device_type):
        return "off"
    return str(torch.get_autocast_dtype(device_type))


def call_descriptor(
    static: dict[str, int | str], backend: str, x: torch.Tensor, variate_dim: int
) -> dict[str, int | bool | str]:
    """The readable descriptor of one call: ``static`` (the module's fields, see :data:`FIELDS`)
    and those of the call, for input ``x`` whose dim ``variate_dim`` holds this rank's variates."""
    device_type = x.device.type
    return {
        **static,
        "protocol": PROTOCOL,
        "backend": backend,
        "resolved backend": resolve_backend(backend, x.device, x.dtype).name,
        "batch size B": x.shape[0],
        "input shape without the variate dim": str(
            tuple(n for dim, n in enumerate(x.shape) if dim != variate_dim)
        ),
        "input dtype": str(x.dtype),
        "device type": device_type,
        "grad enabled": torch.is_grad_enabled(),
        "autocast": _autocast_state(device_type),
    }


def construction_descriptor(fields: dict[str, int | bool | str]) -> dict[str, int | bool | str]:
    """The descriptor checked when a module is built directly, before its replicated weights are
    broadcast (whose sizes must agree): ``fields``, and a placeholder for the fields of a call."""
    return {**dict.fromkeys(FIELDS, "(construction)"), "protocol": PROTOCOL, **fields}


def _mismatch_message(shard: VariateShard, descriptors: list[dict]) -> str:
    lines = [
        f"{field}: "
        + ", ".join(f"rank {rank} has {d.get(field)!r}" for rank, d in enumerate(descriptors))
        for field in FIELDS
        if len({repr(d.get(field)) for d in descriptors}) > 1
    ]
    return (
        f"the ranks of the variate-parallel group disagree (seen on {shard.describe()}, before "
        f"any computation): " + "; ".join(lines) + ". Every rank must build the same module "
        "(same configuration, backend and replicated weights) and call it with inputs of the "
        "same batch size, dtype and shape apart from its own variates, in the same mode."
    )


def start_check(shard: VariateShard, descriptor: dict[str, int | bool | str]) -> Callable[[], None]:
    """Starts the check that all ranks' ``descriptor`` are equal; returns ``settle``, which waits
    for it and raises :class:`VariateParallelMismatch` on every rank if they are not (a second
    call does nothing).

    One all-reduce of ``2·SLOTS`` int64, asynchronous (on the CPU for gloo, else on the
    input's device type, e.g. the current CUDA device for NCCL); on disagreement one
    ``all_gather_object`` for the message.
    """
    what = "all-reduce of the call descriptors (the agreement check)"
    if not group_is_open(shard):
        raise ended_group_failure(shard, what)
    codes = [_code(descriptor[field]) for field in FIELDS] + [0] * (SLOTS - len(FIELDS))
    on = "cpu" if dist.get_backend(shard.group) == "gloo" else descriptor["device type"]
    both = torch.tensor(codes + [-c for c in codes], dtype=torch.int64, device=on)
    work = []
    collective(
        lambda: work.append(
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=shard.group, async_op=True)
        ),
        shard,
        what,
    )

    def settle() -> None:
        if not work:
            return
        collective(work.pop().wait, shard, what)
        if torch.equal(both[:SLOTS], -both[SLOTS:]):
            return
        descriptors: list = [None] * shard.world_size
        collective(
            lambda: dist.all_gather_object(descriptors, descriptor, group=shard.group),
            shard,
            "gather of the call descriptors (the agreement check)",
        )
        raise VariateParallelMismatch(_mismatch_message(shard, descriptors))

    return settle


@contextlib.contextmanager
def agreed_call(shard: VariateShard, descriptor: Callable[[], dict]) -> Iterator[None]:
    """Runs the body with the ranks' agreement on ``descriptor()`` (evaluated only here)
    checked: started first, awaited before the body's first collective, so that it overlaps
    the local work before that (or at the end of a body without one). If the body raises, the
    check is awaited too (a disagreement is then the error raised: it explains the rest).
    Nested uses are transparent: only the outermost call (a model around its layers) checks."""
    if _inside_checked_call.get():
        yield
        return
    settle = start_check(shard, descriptor())
    token = _inside_checked_call.set(True)
    try:
        with before_next_collective(settle):
            try:
                yield
            finally:
                settle()
    finally:
        _inside_checked_call.reset(token)
