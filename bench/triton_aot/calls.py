"""The calls a run makes into the triton backend's launchers, recorded as data and
replayed on ``meta`` tensors to get the launches (kernel, arguments, grid) a GPU would
see, without one.

A :class:`Call` names a public function of :mod:`casa_kernels.ops.triton_kernels` (the
launchers: the op and its stages) and holds its arguments with every tensor reduced to
its shape, strides and dtype. :func:`record_calls` wraps those functions, whatever
they are at the time, and records each outermost call, so a test run under the Triton
interpreter (on the CPU) yields the calls the same tests make on a GPU. Replayed with
the interpreter off (:func:`replay`), the launchers choose their native tiles and
configs, so the recorded launches carry the specialisation the GPU run gets; where a
call leaves the head's split count to the launcher, it is the plan for a GPU of
``sm_count`` SMs (as :func:`bench.cost_model.triton_compile.op_launches` does).

A tests module whose shapes depend on whether the interpreter is on (the interpreter's
tile constants) is recorded at the interpreter's shapes: those few calls differ from
the GPU's and compile on the GPU (the carried cache says how many did).

As a pytest plugin (``-p bench.triton_aot.calls`` with ``CASA_TRITON_RECORD_CALLS=FILE``)
it records every call of the session into FILE (JSON lines).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

RECORD_ENV = "CASA_TRITON_RECORD_CALLS"


@dataclass(frozen=True)
class Call:
    """One call of the launcher ``function`` (a name in the triton_kernels module):
    ``args``/``kwargs`` as :func:`spec_of` gives them, ``allow_tf32`` the value of
    ``torch.backends.cuda.matmul.allow_tf32`` at the call."""

    function: str
    args: list
    kwargs: dict
    allow_tf32: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "function": self.function,
                "args": self.args,
                "kwargs": self.kwargs,
                "allow_tf32": self.allow_tf32,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Call:
        d = json.loads(text)
        return cls(d["function"], d["args"], d["kwargs"], d["allow_tf32"])


def spec_of(value):
    """A JSON-ready description of a launcher argument: a tensor as
    ``{"tensor": [shape, strides, dtype]}``, a tuple of tensors (the weights) as
    ``{"tuple": [type name, items]}``, anything else (ints, floats, None) as itself."""
    if isinstance(value, torch.Tensor):
        return {"tensor": [list(value.shape), list(value.stride()), str(value.dtype)]}
    if isinstance(value, tuple):
        return {"tuple": [type(value).__name__, [spec_of(v) for v in value]]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a launcher argument of type {type(value).__name__}")


def meta_of(spec):
    """The argument a spec describes, tensors as ``meta`` tensors."""
    if isinstance(spec, dict) and "tensor" in spec:
        shape, stride, dtype = spec["tensor"]
        return torch.empty_strided(
            shape, stride, dtype=getattr(torch, dtype.removeprefix("torch.")), device="meta"
        )
    if isinstance(spec, dict) and "tuple" in spec:
        name, items = spec["tuple"]
        values = [meta_of(s) for s in items]
        if name == "ScoreAttentionWeights":
            from casa_kernels.weights import ScoreAttentionWeights

            return ScoreAttentionWeights(*values)
        return tuple(values)
    return spec


def op_call(batch: int, n_vars: int, d_model: int, kernel: int, dtype: torch.dtype) -> Call:
    """The op's call (``triton_score_attention``) for a contiguous ``x: [B, N, D]`` and
    weights of ``dtype``, as the backend makes it."""
    from casa_kernels.weights import ScoreAttentionWeights, weight_shapes

    weights = ScoreAttentionWeights(
        *(
            torch.empty(shape, dtype=dtype, device="meta")
            for shape in weight_shapes(n_vars, d_model, kernel).values()
        )
    )
    x = torch.empty((batch, n_vars, d_model), dtype=dtype, device="meta")
    return Call("triton_score_attention", [spec_of(x), spec_of(weights)], {})


def _launchers(module) -> dict[str, object]:
    """The module's public functions defined in the triton_kernels package (the
    launchers), by name."""
    package = module.__name__
    return {
        name: fn
        for name, fn in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(fn)
        and (fn.__module__ or "").startswith(package)
    }


class CallRecorder:
    """Between :meth:`start` and :meth:`stop`, every outermost call of a launcher is
    appended to ``calls`` (and still runs)."""

    def __init__(self):
        self.calls: list[Call] = []
        self._originals: dict[str, object] = {}
        self._depth = 0

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def recording(*args, **kwargs):
            if self._depth == 0:
                self.calls.append(
                    Call(
                        name,
                        [spec_of(a) for a in args],
                        {k: spec_of(v) for k, v in kwargs.items()},
                        bool(torch.backends.cuda.matmul.allow_tf32),
                    )
                )
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return recording

    def start(self) -> None:
        from casa_kernels.ops import triton_kernels as tk

        self._originals = _launchers(tk)
        for name, fn in self._originals.items():
            setattr(tk, name, self._wrap(name, fn))

    def stop(self) -> None:
        from casa_kernels.ops import triton_kernels as tk

        for name, fn in self._originals.items():
            setattr(tk, name, fn)
        self._originals = {}


@contextlib.contextmanager
def record_calls() -> Iterator[list[Call]]:
    """Within the block, every outermost call of a launcher is appended to the yielded
    list (and still runs)."""
    recorder = CallRecorder()
    recorder.start()
    try:
        yield recorder.calls
    finally:
        recorder.stop()


def replay(call: Call, sm_count: int) -> list:
    """The launches (:class:`bench.cost_model.triton_compile.Launch`) ``call`` makes on
    meta tensors with the native configs, for a GPU of ``sm_count`` SMs."""
    from casa_kernels.ops import triton_kernels as tk

    from ..cost_model.triton_compile import record_launches

    fn = getattr(tk, call.function, None)
    if fn is None:
        raise LookupError(f"{call.function}: no such launcher in {tk.__name__} (a recorded call)")
    args = [meta_of(a) for a in call.args]
    kwargs = {k: meta_of(v) for k, v in call.kwargs.items()}
    if "splits" in inspect.signature(fn).parameters and kwargs.get("splits") is None:
        x = args[0]
        if x.dim() == 3 and x.shape[0] > 0:
            kwargs["splits"] = tk.head_split_count(*x.shape, tk.program_target(sm_count))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = call.allow_tf32
    try:
        with record_launches() as seen:
            fn(*args, **kwargs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return seen


def read_calls(path: str) -> list[Call]:
    """The distinct calls recorded in ``path`` (JSON lines), in first-seen order."""
    with open(path) as f:
        lines = dict.fromkeys(line.strip() for line in f if line.strip())
    return [Call.from_json(line) for line in lines]


# --- pytest plugin ---------------------------------------------------------------------

_session = CallRecorder()


def pytest_configure(config):
    if os.environ.get(RECORD_ENV):
        _session.start()


def pytest_unconfigure(config):
    if not os.environ.get(RECORD_ENV):
        return
    _session.stop()
    with open(os.environ[RECORD_ENV], "w") as f:
        f.writelines(call.to_json() + "\n" for call in _session.calls)
