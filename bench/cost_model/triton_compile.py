"""Compiling the triton backend's kernels for an NVIDIA target without a GPU, with the
run-time specialisation their launchers give them.

The launchers of :mod:`casa_kernels.ops.triton_kernels.launch` run on ``meta`` tensors (shapes
and dtypes, no storage; their data pointers are 0, i.e. 16-byte aligned like a CUDA
allocation) while every ``_launch`` is recorded instead of executed
(:func:`record_launches`). Each recorded launch is then bound and specialised by
Triton's own binder, as ``JITFunction.run`` would on a GPU (integer arguments equal to 1
become constants, multiples of 16 and aligned pointers get divisibility hints), and
compiled for the target (:func:`compile_launch`). Grids come from the launcher's own
grid functions at the chosen config. Recording works under the interpreter too (with its
tile sizes); compiling does not.

Used by the static cost model (:mod:`bench.cost_model`) and by
``tests/ops/triton_compile_check.py``. Needs Triton, not a GPU; unset ``TRITON_INTERPRET``
(the interpreter compiles nothing).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from casa_kernels.ops.triton_kernels import launch as tk
from casa_kernels.ops.triton_kernels.backward import tail_backward
from casa_kernels.weights import ScoreAttentionWeights, weight_shapes


@dataclass
class Launch:
    """One recorded launch: the kernel (autotuned or not), its grid (a tuple, or a
    function of the config's meta-parameters) and its arguments."""

    kernel: object
    grid: object
    args: tuple
    kwargs: dict

    @property
    def jit_function(self) -> triton.runtime.JITFunction:
        return jit_function(self.kernel)

    @property
    def source(self):
        """The kernel's Python function (under autotuner and jit, or interpreter, wrappers)."""
        fn = self.kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.source.__name__

    def bound_args(self) -> dict:
        """``{parameter name: value}`` of the launch's positional arguments."""
        return dict(zip(inspect.signature(self.source).parameters, self.args))


@dataclass(frozen=True)
class Config:
    """Meta-parameters and launch options of one compile of a launch."""

    kwargs: dict
    num_warps: int
    num_stages: int


def jit_function(kernel) -> triton.runtime.JITFunction:
    """The JITFunction under an autotuner (or the kernel itself)."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, every launch of the triton backend is appended to the yielded
    list instead of running."""
    seen: list[Launch] = []
    real = tk._launch
    tk._launch = lambda kernel, grid, *args, **kwargs: seen.append(
        Launch(kernel, grid, args, kwargs)
    )
    try:
        yield seen
    finally:
        tk._launch = real


def meta_problem(
    batch: int, n_vars: int, d_model: int, kernel: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ScoreAttentionWeights]:
    """``x: [batch, n_vars, d_model]`` and weights as ``meta`` tensors of ``dtype``."""
    weights = ScoreAttentionWeights(
        *(
            torch.empty(shape, dtype=dtype, device="meta")
            for shape in weight_shapes(n_vars, d_model, kernel).values()
        )
    )
    return torch.empty((batch, n_vars, d_model), dtype=dtype, device="meta"), weights


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    """``torch.backends.cuda.matmul.allow_tf32`` set to ``allow`` within the block."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def op_launches(
    batch: int,
    n_vars: int,
    d_model: int,
    kernel: int,
    dtype: torch.dtype,
    *,
    sm_count: int,
    allow_tf32: bool = False,
) -> list[Launch]:
    """The launches of one ``triton_score_attention`` call, in order, for a GPU of
    ``sm_count`` SMs (the launcher's plans made for it)."""
    x, weights = meta_problem(batch, n_vars, d_model, kernel, dtype)
    with _tf32(allow_tf32), record_launches() as seen:
        tk.triton_score_attention(x, weights, sm_count=sm_count)
    return seen


def backward_launches(
    batch: int,
    n_vars: int,
    d_model: int,
    kernel: int,
    dtype: torch.dtype,
    *,
    allow_tf32: bool = False,
) -> list[Launch]:
    """The Triton launches of the op's fused backward (the tail's three:
    ``triton_kernels.tail_backward``) with every gradient wanted, in order."""
    x, weights = meta_problem(batch, n_vars, d_model, kernel, dtype)
    h5 = torch.empty((batch, d_model // 4, d_model // 2), dtype=torch.float32, device="meta")
    stats = torch.empty((batch, d_model), dtype=torch.float32, device="meta")
    with _tf32(allow_tf32), record_launches() as seen:
        tail_backward(x, x, h5, weights, stats, stats, want_dx=True, want_dv=True, want_dt=True)
    return seen


def configs(launch: Launch, all_configs: bool = False) -> list[Config]:
    """The configs a launch compiles with: the autotuner's first (the one
    ``CASA_TRITON_SINGLE_CONFIG=1`` keeps, and the one the head's split count is planned
    for) or all of them; a launch without autotuner, its own options."""
    tuned = getattr(launch.kernel, "configs", None)
    if tuned is None:
        return [
            Config(
                {},
                launch.kwargs.get("num_warps", 4),
                launch.kwargs.get("num_stages", 3),
            )
        ]
    return [
        Config(dict(c.kwargs), c.num_warps, c.num_stages)
        for c in tuned[: None if all_configs else 1]
    ]


def grid(launch: Launch, config: Config) -> tuple[int, int, int]:
    """The launch's grid at ``config``, from the launcher's own grid (function)."""
    meta = {**launch.bound_args(), **launch.kwargs, **config.kwargs}
    dims = tuple(launch.grid(meta) if callable(launch.grid) else launch.grid)
    return (*dims, *(1,) * (3 - len(dims)))


def prepare(launch: Launch, config: Config, target: GPUTarget):
    """``(source, options)`` that ``triton.compile`` gets for the launch at ``config`` on
    ``target``: bound and specialised by Triton's binder as ``JITFunction.run`` does."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    fn = launch.jit_function
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {
        **launch.kwargs,
        **config.kwargs,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def compile_launch(launch: Launch, config: Config, target: GPUTarget):
    """The launch compiled for ``target`` at ``config`` (a Triton CompiledKernel), bound
    and specialised by Triton's binder as ``JITFunction.run`` does."""
    source, options = prepare(launch, config, target)
    return triton.compile(source, target=target, options=options)


def cache_key(launch: Launch, config: Config, target: GPUTarget) -> tuple[str, str]:
    """``(installation, rest)``: the two parts of the key ``triton.compile`` hashes into
    the launch's cache entry name (``sha256(installation + rest)``). ``installation``
    is ``triton_key()``, a digest of this Triton's files, its native library included (so
    it differs between builds of one release, e.g. for two Python versions); ``rest``
    is the kernel source, specialisation, backend (ptxas version, arch) and options."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import make_backend
    from triton.runtime.cache import get_cache_key, triton_key

    source, options = prepare(launch, config, target)
    backend = make_backend(target)
    parsed = backend.parse_options(dict(options, **source.parse_options()))
    key = get_cache_key(source, backend, parsed, env_vars=get_cache_invalidating_env_vars())
    installation = triton_key()
    if not key.startswith(installation):
        raise RuntimeError(
            f"triton {triton.__version__}: its cache key no longer starts with triton_key()"
        )
    return installation, key[len(installation) :]


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """``cuobjdump <flags>`` on a cubin, with the cuobjdump Triton ships."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        return subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, *flags, str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) as ``ptxas -v``
    (Triton's) reports them for ``ptx`` compiled for sm_<arch> (sm_90a for 90)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        suffix = "a" if arch == 90 else ""
        done = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name=sm_{arch}{suffix}",
                str(src),
                "-o",
                str(pathlib.Path(tmp, "kernel.cubin")),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = done.stdout + done.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (
        int(v)
        for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    )
    return regs, stores, loads
