"""The Python half of ``bench/device_check.sh``: preflight, per-step records, packing.

``python -m bench.device_check COMMAND`` (from the repository root):

* ``preflight WORK [--dry-run]`` — checks the machine (GPU, triton, nvcc against torch's
  CUDA, setuptools, ninja, pytest, compute-sanitizer, optional packages), prints one line
  per check and writes ``WORK/preflight.env`` (shell variables for the script) and
  ``WORK/environment.json``. Exit 1 when a required check fails. With ``--dry-run`` the
  GPU checks are reported but not required. Where ``import setuptools`` fails it looks for
  a setuptools to borrow (a wheel, or another Python's installed copy) and names the
  folder to put on ``PYTHONPATH`` for the build.
* ``cuda-kernel`` — exit 0 when ``casa::fused_score_attention`` has a CUDA kernel, else 1
  with the reason.
* ``sanitize BACKEND [--device D]`` — the small workload run under compute-sanitizer:
  the backend at two small shapes in float32 and bfloat16, checked against the reference.
* ``record WORK OUT STEP STATUS SECONDS CAP [REASON]`` — adds one step's row (with its key
  figure, read from its log and results) to ``WORK/steps.json``, then rewrites
  ``OUT/device_check_summary.{md,json}`` and ``OUT/device_check.tar.gz`` (all of WORK:
  ``logs/``, ``results/``, ``environment.json``); each file is replaced atomically.
* ``table WORK`` — prints the summary table.
* ``unpack ARCHIVE [--into DIR]`` — back on a development machine: upserts the archive's
  benchmark rows into DIR (default ``bench/results/<gpu-name>/``) beside the rows already
  there, rebuilds its ``summary.json``, scaling plots and results pages (:mod:`bench.report`),
  and copies the two summaries.

``record`` and ``table`` use the standard library only, so the records and the archive
are written even where torch does not import.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

ARCHIVE = "device_check.tar.gz"
SUMMARY_MD = "device_check_summary.md"
SUMMARY_JSON = "device_check_summary.json"
STATUSES = ("ok", "failed", "timeout", "skipped")
# A log above this size goes into the archive as its head and tail.
LOG_KEEP_BYTES = 2 << 20
SINGLE_CONFIG_VAR = "CASA_TRITON_SINGLE_CONFIG"
# The sanitize workload: (batch, n_vars, d_model, kernel) x dtype, small and ragged.
SANITIZE_SHAPES = ((2, 37, 64, 3), (1, 7, 128, 5))
SANITIZE_DTYPES = ("float32", "bfloat16")


# --- preflight --------------------------------------------------------------------------


def _slug(text: str) -> str:
    """As bench.results.slug (that module imports torch)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _setuptools_version(path: str) -> tuple[int, ...]:
    """The version in a wheel's name, or in the dist-info folder beside an installed copy."""
    names = [os.path.basename(path)] + [
        os.path.basename(p)
        for p in glob.glob(os.path.join(os.path.dirname(path), "setuptools-*-info"))
    ]
    for name in names:
        match = re.match(r"setuptools-(\d+(?:\.\d+)*)", name)
        if match:
            return tuple(int(p) for p in match.group(1).split("."))
    return ()


def _imports_setuptools(pythonpath: str | None) -> bool:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    probe = "import setuptools; from setuptools.command.build_ext import build_ext"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=60)
    return result.returncode == 0


def _setuptools_candidates() -> list[tuple[str, str]]:
    """(kind, path) of the setuptools copies on this machine, newest first: wheels (a
    carried ``.whl/``, Debian's python-wheels, virtualenv's seed wheels) and other
    Pythons' installed packages."""
    stdlib = sysconfig.get_paths()["stdlib"]
    wheel_globs = [
        ".whl/setuptools-*.whl",
        "/usr/share/python-wheels/setuptools-*.whl",
        os.path.join(stdlib, "ensurepip", "_bundled", "setuptools-*.whl"),
        os.path.join(
            sys.base_prefix,
            "lib",
            "python3*",
            "site-packages",
            "virtualenv",
            "seed",
            "wheels",
            "embed",
            "setuptools-*.whl",
        ),
    ]
    installed_globs = [
        "/usr/lib/python3/dist-packages/setuptools",
        "/usr/lib/python3*/site-packages/setuptools",
        "/usr/local/lib/python3*/*-packages/setuptools",
        os.path.join(sys.base_prefix, "lib", "python3*", "site-packages", "setuptools"),
        "/opt/*/lib/python3*/site-packages/setuptools",
    ]
    wheels = [("wheel", p) for g in wheel_globs for p in glob.glob(g)]
    installed = [("installed", p) for g in installed_globs for p in glob.glob(g)]
    return sorted(set(wheels + installed), key=lambda c: _setuptools_version(c[1]), reverse=True)


def borrow_setuptools(work: Path) -> tuple[str | None, str]:
    """A folder that makes ``import setuptools`` work when put on PYTHONPATH, and how it
    was found; (None, why not) when no copy on this machine imports."""
    tried = []
    for n, (kind, path) in enumerate(_setuptools_candidates()):
        target = work / "setuptools_site" / str(n)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        if kind == "wheel":
            with zipfile.ZipFile(path) as wheel:
                wheel.extractall(target)
        else:  # link the package and its companions next to it, nothing else of that site
            site = os.path.dirname(path)
            for name in ("setuptools", "pkg_resources", "_distutils_hack"):
                if os.path.isdir(os.path.join(site, name)):
                    (target / name).symlink_to(os.path.join(site, name))
        if _imports_setuptools(str(target)):
            return str(target), f"borrowed from {path}"
        tried.append(path)
    if not tried:
        return None, "no setuptools wheel or installed copy found on this machine"
    return None, "none of these imports: " + ", ".join(tried)


# casa_kernels/cutlass_headers.py, run by path: the preflight runs where torch (which the
# package imports) may not.
CUTLASS_HEADERS = runpy.run_path(
    str(Path(__file__).parents[1] / "casa_kernels" / "cutlass_headers.py")
)
CUTLASS_WHEEL = f"nvidia_cutlass-{CUTLASS_HEADERS['CUTLASS_VERSION']}-py3-none-any.whl"


def find_cutlass(work: Path) -> tuple[str | None, str]:
    """The CUTLASS include folder the CUDA build will use (as the build finds it:
    CUTLASS_PATH or the installed nvidia-cutlass wheel; else a carried ``.whl/`` copy of
    the wheel unpacked into WORK), and how it was found; (None, why not)."""
    include, how = CUTLASS_HEADERS["find_include"]()
    if include is not None or os.environ.get("CUTLASS_PATH"):
        return include, how
    wheels = sorted(glob.glob(".whl/nvidia_cutlass-*.whl"))
    if wheels:
        target = work / "cutlass_site"
        shutil.rmtree(target, ignore_errors=True)
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(target)
        include = str(target / "cutlass_library" / "source" / "include")
        if CUTLASS_HEADERS["has_cute"](include):
            return include, f"unpacked from {wheels[-1]}"
    return None, f"{how}, or carry the wheel as .whl/{CUTLASS_WHEEL}"


def _find_tool(name: str, cuda_home: str | None) -> str | None:
    """``name`` on PATH, beside the running Python, or in a CUDA toolkit's bin folder."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found:
        return found
    homes = [cuda_home, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        candidate = os.path.join(home, "bin", name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _nvcc_release(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _module_version(name: str) -> tuple[str | None, str]:
    """(version, "") when ``name`` imports, else (None, the error)."""
    try:
        module = __import__(name)
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        return None, f"{type(error).__name__}: {error}"
    return str(getattr(module, "__version__", "?")), ""


def build_arch(major: int, minor: int) -> str:
    """TORCH_CUDA_ARCH_LIST for the GPU of compute capability major.minor: its own
    architecture only, Hopper's as 9.0a (sm_90a: the arch-specific instructions, as
    .ci/compile_cuda.sh and the cost model compile)."""
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


class Checks:
    """Preflight rows: (check, verdict, detail); verdict ok / MISSING / note / skipped.

    ``gpu``: needed by the GPU steps only, so not required in a dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.rows: list[tuple[str, str, str]] = []
        self.missing: list[str] = []

    def add(
        self, name: str, ok: bool, detail: str, *, required: bool = True, gpu: bool = False
    ) -> None:
        if ok:
            verdict = "ok"
        elif gpu and self.dry_run:
            verdict = "skipped"
            detail += " (dry run: not required)"
        elif required:
            verdict = "MISSING"
            self.missing.append(name)
        else:
            verdict = "note"
        self.rows.append((name, verdict, detail))


def preflight(work: Path, dry_run: bool) -> int:
    """Runs the checks, prints them, writes preflight.env and environment.json; 1 when a
    required check fails. A check that crashes is reported as one; what was found before
    it is still written."""
    checks = Checks(dry_run)
    env: dict[str, str] = {}
    facts: dict = {"python": sys.version.split()[0], "python_executable": sys.executable}
    try:
        _run_checks(work, checks, env, facts)
    except Exception as error:  # noqa: BLE001 - reported, and the script goes on with what was found
        checks.add("preflight itself", False, f"crashed: {type(error).__name__}: {error}")

    width = max(len(name) for name, _, _ in checks.rows)
    for name, verdict, detail in checks.rows:
        print(f"{name:<{width}}  {verdict:<7}  {detail}")
    headline = ", ".join(
        filter(
            None,
            (
                facts.get("gpu"),
                f"torch {facts.get('torch', 'missing')}",
                f"triton {facts.get('triton', '?')}",
                f"nvcc {facts.get('nvcc', '?')}",
            ),
        )
    )
    print(
        f"preflight: {'missing: ' + ', '.join(checks.missing) if checks.missing else 'ok'}; {headline}"
    )

    (work / "preflight.env").write_text(
        "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    )
    facts["preflight"] = {name: f"{verdict}: {detail}" for name, verdict, detail in checks.rows}
    (work / "environment.json").write_text(json.dumps(facts, indent=2) + "\n")
    return 1 if checks.missing else 0


def _run_checks(work: Path, checks: Checks, env: dict[str, str], facts: dict) -> None:
    checks.add("python", True, f"{facts['python']} ({sys.executable})")

    torch_version, error = _module_version("torch")
    torch_cuda = None
    gpu_reason = ""
    if torch_version is None:
        checks.add("torch", False, error)
        gpu_reason = f"torch does not import ({error})"
    else:
        import torch

        torch_cuda = torch.version.cuda
        facts.update(torch=torch_version, torch_cuda=str(torch_cuda))
        checks.add("torch", True, f"{torch_version} (CUDA {torch_cuda})")
        if not torch.cuda.is_available():
            gpu_reason = (
                "torch sees no CUDA device"
                if torch_cuda
                else f"torch {torch_version} is built without CUDA"
            )
        else:
            props = torch.cuda.get_device_properties(0)
            facts.update(
                gpu=props.name,
                gpu_capability=f"{props.major}.{props.minor}",
                gpu_memory_gib=f"{props.total_memory / 2**30:.1f}",
                gpu_multiprocessors=str(props.multi_processor_count),
            )
            env.update(
                PF_GPU_SLUG=_slug(props.name), PF_GPU_ARCH=build_arch(props.major, props.minor)
            )
    checks.add(
        "CUDA device",
        not gpu_reason,
        gpu_reason
        or f"{facts['gpu']} (sm_{facts['gpu_capability'].replace('.', '')}, "
        f"{facts['gpu_memory_gib']} GiB, {facts['gpu_multiprocessors']} SMs)",
        gpu=True,
    )
    env["PF_NO_GPU"] = gpu_reason

    triton_version, error = _module_version("triton")
    facts["triton"] = triton_version or "missing"
    checks.add("triton", triton_version is not None, triton_version or error, gpu=True)
    env["PF_NO_TRITON"] = "" if triton_version else f"triton does not import ({error})"
    single = any(
        SINGLE_CONFIG_VAR in Path(p).read_text()
        for p in glob.glob("casa_kernels/ops/triton_kernels/*.py")
    )
    checks.add(
        SINGLE_CONFIG_VAR,
        single,
        "read by the Triton kernels: tests and verify use one config per kernel"
        if single
        else "not read by this checkout's Triton kernels: tests and verify autotune every config (slow)",
        required=False,
    )

    nvcc = _find_tool("nvcc", None)
    release = _nvcc_release(nvcc) if nvcc else None
    facts["nvcc"] = release or "missing"
    if nvcc is None:
        nvcc_problem = (
            "nvcc not found (PATH, beside python, CUDA_HOME, CUDA_PATH, /usr/local/cuda*)"
        )
    elif release is None:
        nvcc_problem = f"{nvcc} --version names no release"
    elif torch_cuda is None:
        nvcc_problem = f"nvcc {release} ({nvcc}) but torch is built without CUDA"
    elif release.split(".")[0] != torch_cuda.split(".")[0]:
        nvcc_problem = (
            f"nvcc {release} ({nvcc}) but torch is built for CUDA {torch_cuda}: majors differ"
        )
    else:
        nvcc_problem = ""
        env["PF_CUDA_HOME"] = os.environ.get("CUDA_HOME") or str(Path(nvcc).resolve().parent.parent)
    checks.add(
        "nvcc",
        not nvcc_problem,
        nvcc_problem or f"{release} ({nvcc}), CUDA major = torch's {torch_cuda}",
        gpu=True,
    )
    env["PF_NO_NVCC"] = nvcc_problem

    sanitizer = _find_tool("compute-sanitizer", env.get("PF_CUDA_HOME"))
    checks.add("compute-sanitizer", sanitizer is not None, sanitizer or "not found", gpu=True)
    env["PF_SANITIZER"] = sanitizer or ""

    if _imports_setuptools(None):
        version, _ = _module_version("setuptools")
        checks.add("setuptools", True, str(version))
        env["PF_SETUPTOOLS_PATH"] = env["PF_NO_SETUPTOOLS"] = ""
    else:
        path, how = borrow_setuptools(work)
        checks.add(
            "setuptools",
            path is not None,
            f"not importable by {sys.executable}; " + (f"{how}: {path}" if path else how),
            gpu=True,
        )
        env["PF_SETUPTOOLS_PATH"] = path or ""
        env["PF_NO_SETUPTOOLS"] = "" if path else f"setuptools is not importable and {how}"

    cutlass, how = find_cutlass(work)
    checks.add("CUTLASS headers", cutlass is not None, how, gpu=True)
    env["PF_CUTLASS_PATH"] = cutlass or ""
    env["PF_NO_CUTLASS"] = "" if cutlass else f"CUTLASS headers {how}"

    ninja = _find_tool("ninja", None)
    checks.add(
        "ninja",
        ninja is not None,
        ninja or "not found: the build would run one file at a time",
        gpu=True,
    )
    env["PF_NINJA_DIR"] = os.path.dirname(ninja) if ninja else ""

    pytest_version, error = _module_version("pytest")
    checks.add("pytest", pytest_version is not None, pytest_version or error, gpu=True)
    env["PF_NO_PYTEST"] = "" if pytest_version else f"pytest does not import ({error})"
    for name, without in (
        ("hypothesis", "the fuzz tests are skipped"),
        ("tqdm", "no progress bars"),
        ("matplotlib", "no plots"),
    ):
        version, _ = _module_version(name)
        checks.add(
            name, version is not None, version or f"not installed: {without}", required=False
        )


# --- GPU-side helpers -------------------------------------------------------------------


def cuda_kernel() -> int:
    from casa_kernels.ops.extension import FUSED_OP, extension_error, has_kernel_for

    error = extension_error()
    if error is not None:
        print(f"build: FAILED, {error}")
        return 1
    from casa_kernels import _C

    if not has_kernel_for("CUDA"):
        print(
            f"build: FAILED, {_C.__file__} loaded but {FUSED_OP} has no CUDA kernel: that build had "
            "no CUDA sources or did not use them (setup.py: FORCE_CUDA=1 and csrc/cuda/*.cu)"
        )
        return 1
    print(f"build: {FUSED_OP} has a CUDA kernel ({_C.__file__}); {embedded_archs(_C.__file__)}")
    return 0


def embedded_archs(library: str) -> str:
    """The GPU architectures ``library`` embeds machine code for, as cuobjdump lists them."""
    tool = _find_tool("cuobjdump", os.environ.get("CUDA_HOME"))
    if tool is None:
        return "cuobjdump not found: architectures not listed"
    listing = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True)
    return "cubins for " + (", ".join(archs_in_listing(listing.stdout)) or "no architecture")


def archs_in_listing(listing: str) -> list[str]:
    """``sm_XX[a]`` names in a ``cuobjdump --list-elf`` listing, sorted, once each."""
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", listing)))


def sanitize(backend: str, device: str) -> int:
    """Small shapes through ``backend``, each checked against the reference."""
    import torch

    from casa_kernels import casa_attention
    from casa_kernels.tolerance import compare
    from casa_kernels.weights import ScoreAttentionWeights

    g = torch.Generator().manual_seed(0)
    calls = failures = 0
    for batch, n_vars, d_model, kernel in SANITIZE_SHAPES:
        for dtype in (getattr(torch, name) for name in SANITIZE_DTYPES):
            w = ScoreAttentionWeights.random(
                n_vars, d_model, kernel, dtype=dtype, device=device, generator=g
            )
            x = torch.randn(batch, n_vars, d_model, generator=g).to(device=device, dtype=dtype)
            y = casa_attention(x, w, backend=backend)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            result = compare(y, x, w)
            calls += 1
            failures += not result.passed
            print(
                f"sanitize {backend} {str(dtype).removeprefix('torch.')} B={batch} N={n_vars} D={d_model} "
                f"k={kernel}: max abs {result.max_abs_error:.2e}, {'PASS' if result.passed else 'FAIL'}"
            )
    print(f"sanitize {backend}: {calls - failures} of {calls} calls match the reference")
    return 1 if failures else 0


# --- records, summary, archive ----------------------------------------------------------


def _last_match(pattern: str, text: str) -> str | None:
    matches = re.findall(pattern, text, flags=re.MULTILINE)
    return matches[-1].strip() if matches else None


def _last_line(text: str) -> str:
    """The last line that reads like an error (an exception, FAILED, error:), else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"^\w*(Error|Exception)\b|FAIL|\berror:", line)]
    return (errors or lines or ["(empty log)"])[-1][:200]


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _us(row: dict) -> str:
    return f"{float(row['latency_ms_p50']) * 1e3:.0f} µs"


def _status_counts(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return f"{len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _p50_at(rows: list[dict], config: str, batch: int) -> dict[str, str]:
    """provider -> p50 of the ok bfloat16 rows at (config, batch), newest row winning."""
    found = {}
    for r in sorted(rows, key=lambda r: r.get("timestamp", "")):
        if (
            r["status"] == "ok"
            and r["config"] == config
            and r["batch"] == str(batch)
            and r["dtype"] == "bfloat16"
        ):
            found[r["provider"]] = _us(r)
    return found


def _bench_figure(step: str, results: Path) -> str | None:
    if step == "bench-attention":
        rows = _read_csv(results / "attention.csv")
        p50 = _p50_at(rows, "Traffic", 16)
        shown = (
            "; Traffic B=16 p50 " + ", ".join(f"{p} {t}" for p, t in sorted(p50.items()))
            if p50
            else ""
        )
        return _status_counts(rows) + shown if rows else None
    if step == "bench-scaling":
        rows = _read_csv(results / "scaling.csv")
        return _status_counts(rows) if rows else None
    if step == "bench-autotuned":
        rows = _read_csv(results / "autotuned" / "attention.csv")
        tuned = _p50_at(rows, "Traffic", 16).get("casa-triton")
        if tuned is None:
            return _status_counts(rows) if rows else None
        single = _p50_at(_read_csv(results / "attention.csv"), "Traffic", 16).get("casa-triton")
        return f"casa-triton Traffic B=16 p50: autotuned {tuned}, single config {single or 'not measured'}"
    return None


def _info_figure(text: str) -> str | None:
    rows = dict(re.findall(r"^(backend \S+|extension \S+)\s+(.*)$", text, flags=re.MULTILINE))
    if not rows:
        return None
    available = [
        k.split()[1] for k, v in rows.items() if k.startswith("backend") and v == "available"
    ]
    extension = next((v for k, v in rows.items() if k.startswith("extension")), "")
    return f"available: {', '.join(available) or 'none'}; extension {extension}"[:200]


FIGURE_PATTERNS = {
    "preflight": r"^preflight: .*$",
    "build": r"^build: .*$",
    "tests": r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected).* in [\d.]+s.*?)\s*=*$",
    "verify": r"^\d+ passed, \d+ failed, \d+ skipped.*$",
    "memcheck": r"^=+ ERROR SUMMARY: .*$",
    "racecheck": r"^=+ RACECHECK SUMMARY: .*$",
}


def key_figure(step: str, status: str, log: Path, results: Path, reason: str = "") -> str:
    """The one-line result of a step for the summary table: what its results or log say,
    followed, unless it ended ok, by the reason or the log's last line."""
    if status == "skipped":
        return reason
    text = log.read_text(errors="replace") if log.is_file() else ""
    if step.startswith("bench-"):
        figure = _bench_figure(step, results)
    elif step == "info":
        figure = _info_figure(text)
    elif step == "triton-cache":
        lines = re.findall(r"^triton cache: (.*)$", text, flags=re.MULTILINE)
        figure = "; ".join(lines) or None
    else:
        pattern = FIGURE_PATTERNS.get(step.split("-")[0])
        figure = _last_match(pattern, text) if pattern else None
    if status != "ok" or figure is None:
        hint = reason or _last_line(text)
        if figure is None:
            figure = hint
        elif hint not in figure:
            figure = f"{figure}; {hint}"
    return figure.lstrip("= ").replace("|", "/")


def _steps(work: Path) -> list[dict]:
    path = work / "steps.json"
    return json.loads(path.read_text()) if path.is_file() else []


def summary_table(work: Path) -> str:
    steps = _steps(work)
    lines = [
        "| step | status | seconds | cap s | key figure |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    lines += [
        f"| {s['step']} | {s['status']} | {s['seconds']} | {s['cap_s']} | {s['key_figure']} |"
        for s in steps
    ]
    bad = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
    total = sum(s["seconds"] for s in steps)
    verdict = f"{len(bad)} failed: {', '.join(bad)}" if bad else "no step failed"
    lines.append(f"| total | {verdict} | {total} | {sum(s['cap_s'] for s in steps)} | |")
    return "\n".join(lines)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _add_file(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    size = path.stat().st_size
    if size <= LOG_KEEP_BYTES:
        tar.add(path, arcname=arcname)
        return
    half = LOG_KEEP_BYTES // 2
    with path.open("rb") as f:
        head = f.read(half)
        f.seek(size - half)
        tail = f.read()
    data = head + f"\n[... {size - 2 * half} bytes cut by device_check ...]\n".encode() + tail
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime = len(data), int(path.stat().st_mtime)
    tar.addfile(info, io.BytesIO(data))


def pack(work: Path, out: Path) -> None:
    """Rewrites OUT's three files from WORK."""
    out.mkdir(parents=True, exist_ok=True)
    steps = _steps(work)
    env_path = work / "environment.json"
    environment = json.loads(env_path.read_text()) if env_path.is_file() else {}
    table = summary_table(work)
    title = environment.get("gpu", "no GPU")
    (work / SUMMARY_MD).write_text(f"# device_check: {title}\n\n{table}\n")
    summary = {
        "environment": environment,
        "steps": steps,
        "failed": [s["step"] for s in steps if s["status"] in ("failed", "timeout")],
    }
    (work / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.rglob("*")):
            relative = path.relative_to(work)
            if path.is_file() and not path.is_symlink() and relative.parts[0] != "setuptools_site":
                _add_file(tar, path, str(relative))
    _atomic_write(out / ARCHIVE, buffer.getvalue())
    for name in (SUMMARY_MD, SUMMARY_JSON):
        _atomic_write(out / name, (work / name).read_bytes())


def record(
    work: Path, out: Path, step: str, status: str, seconds: int, cap: int, reason: str
) -> None:
    log = next(iter(sorted((work / "logs").glob(f"*-{step}.log"))), work / "logs" / f"{step}.log")
    row = {
        "step": step,
        "status": status,
        "seconds": seconds,
        "cap_s": cap,
        "key_figure": key_figure(step, status, log, work / "results", reason),
        "log": str(log.relative_to(work)) if log.is_file() else "",
    }
    steps = _steps(work)
    # A step recorded again (the triton-cache row, at the end) keeps its place.
    at = next((i for i, s in enumerate(steps) if s["step"] == step), len(steps))
    steps[at : at + 1] = [row]
    (work / "steps.json").write_text(json.dumps(steps, indent=2) + "\n")
    print(f"{step}: {status} ({seconds}s of {cap}s) {row['key_figure']}")
    pack(work, out)


def unpack(archive: Path, into: Path | None, figures: Path | None = None) -> int:
    """Upserts the archive's CSVs under ``into`` (default: bench/results/<gpu>/), rebuilds
    the summaries, plots and pages, and writes the attention suite's CUDA figures into
    ``figures`` (default: the package's measured_speedups.json, which decides ``auto`` on
    that GPU model: casa_kernels/ops/measured.py)."""
    from casa_kernels.ops import measured

    from . import plots, report, results, summary

    with tarfile.open(archive) as tar:
        files = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            return tar.extractfile(files[name]).read()

        environment = json.loads(read("environment.json")) if "environment.json" in files else {}
        if into is None:
            if "gpu" not in environment:
                print(
                    f"unpack: {archive} names no GPU (environment.json); pass --into",
                    file=sys.stderr,
                )
                return 2
            into = Path(__file__).resolve().parent / "results" / _slug(environment["gpu"])
        csvs = [
            name for name in sorted(files) if name.startswith("results/") and name.endswith(".csv")
        ]
        written = []
        for name in csvs:
            target = into / name.removeprefix("results/")
            results.upsert_rows(target, list(csv.DictReader(io.StringIO(read(name).decode()))))
            written.append(target)
        into.mkdir(parents=True, exist_ok=True)
        for name in (SUMMARY_MD, SUMMARY_JSON):
            if name in files:
                (into / name).write_bytes(read(name))
                written.append(into / name)
    for folder in sorted({path.parent for path in written if path.suffix == ".csv"}):
        written.append(summary.write_summary(folder))
        if (folder / "scaling.csv").is_file():  # device_check's scaling run: bf16, B=1
            written += plots.plot_scaling(folder, dtype="bfloat16", batch=1)
    written += report.write_pages(report.result_folders(into))
    attention = into / "attention.csv"
    if attention.is_file():
        source = os.path.relpath(attention.resolve(), Path(__file__).resolve().parents[1])
        devices = measured.speedups_from_rows(results.read_rows(attention), source)
        if devices:
            figures = figures or measured.FIGURES
            measured.merge_into(figures, devices)
            written.append(figures)
    for path in written:
        print(f"unpack: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.device_check", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("work", type=Path)
    p.add_argument("--dry-run", action="store_true")
    sub.add_parser("cuda-kernel")
    p = sub.add_parser("sanitize")
    p.add_argument("backend")
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("record")
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("step")
    p.add_argument("status", choices=STATUSES)
    p.add_argument("seconds", type=int)
    p.add_argument("cap", type=int)
    p.add_argument("reason", nargs="?", default="")
    p = sub.add_parser("table")
    p.add_argument("work", type=Path)
    p = sub.add_parser("unpack")
    p.add_argument("archive", type=Path)
    p.add_argument("--into", type=Path, default=None)
    p.add_argument(
        "--figures",
        type=Path,
        default=None,
        help="the JSON of measured speed-ups to update (default: the package's, which decides auto)",
    )
    args = parser.parse_args(argv)
    if args.command == "preflight":
        return preflight(args.work, args.dry_run)
    if args.command == "cuda-kernel":
        return cuda_kernel()
    if args.command == "sanitize":
        return sanitize(args.backend, args.device)
    if args.command == "record":
        record(args.work, args.out, args.step, args.status, args.seconds, args.cap, args.reason)
        return 0
    if args.command == "unpack":
        return unpack(args.archive, args.into, args.figures)
    print(summary_table(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
