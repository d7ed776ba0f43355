"""A Triton cache built on the CPU for a GPU run, carried to the GPU machine and
installed there under the keys that machine's Triton computes.

Triton names a cache entry ``base32(sha256(triton_key() + rest))``: ``rest`` covers the
kernel source, its specialisation, the backend (ptxas version, arch) and the options;
``triton_key()`` digests the installed Triton's files, its native library included, so
two builds of one release (e.g. the wheels for Python 3.11 and 3.12) give different
entry names for the same, byte-identical, compiled kernel. :func:`build` therefore
records each entry's ``rest`` in the manifest, and :func:`install` re-keys every entry
with the GPU machine's own ``triton_key()``. Installing needs the same Triton release,
the same ptxas (``backend.hash()``) and the GPU's arch equal to the one built for;
otherwise nothing is installed and the kernels compile on the GPU, as without a cache.

Carried per entry: the metadata JSON and the cubin (all a cache hit reads); the group
file is written at install time (it holds absolute paths).

Layout of a built folder: ``manifest.json`` and ``entries/<entry name>/<kernel>.{json,cubin}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import shutil
import tempfile
import time

MANIFEST = "manifest.json"
INSTALLED = "casa_carried.json"  # in the GPU's cache folder: the entries install put there
KEEP_SUFFIXES = (".json", ".cubin")


def arch_name(arch: int) -> str:
    """Triton's NVIDIA target ``arch`` as the cubin names it (90 compiles sm_90a)."""
    return f"sm_{arch}" + ("a" if arch == 90 else "")


def entry_name(key: str) -> str:
    """The cache folder Triton uses for a full cache key (``get_cache_manager``'s name)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=")


def source_fingerprint() -> str:
    """sha256 over the Python files of the triton_kernels module (a file or a package)."""
    from casa_kernels.ops import triton_kernels as tk

    path = pathlib.Path(tk.__file__)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def launcher_digest(launch, config, target) -> str | None:
    """sha256 of the C launcher Triton's CUDA driver builds (gcc, on the GPU machine, for
    its Python) for this launch's signature, one build per distinct digest; None for a
    Triton that builds no launcher per signature."""
    try:
        from triton.backends.nvidia.driver import make_launcher
    except ImportError:
        return None

    from ..cost_model.triton_compile import prepare

    source, _ = prepare(launch, config, target)
    constants = {
        ((source.fn.arg_names.index(k),) if isinstance(k, str) else k): v
        for k, v in source.constants.items()
    }
    return digest(make_launcher(constants, dict(source.signature), None))


def plan(step_calls: dict[str, list], all_config_steps: set[str], sm_count: int, arch: int):
    """What each step compiles: ``(entries, steps)`` where ``entries`` maps an entry name
    (as computed by this Triton) to ``{"rest", "kernel", "launch", "config", "launcher"}``
    with the launch and config to compile and its launcher's digest, and ``steps`` maps a step to its calls, launches and
    the entry names it needs (all autotune configs for ``all_config_steps``, else the
    first). Needs Triton, not a GPU."""
    from triton.backends.compiler import GPUTarget

    from ..cost_model.triton_compile import cache_key, configs
    from .calls import replay

    target = GPUTarget("cuda", arch, 32)
    entries: dict[str, dict] = {}
    steps: dict[str, dict] = {}
    for step, calls in step_calls.items():
        needed: dict[str, None] = {}
        launches = 0
        for call in calls:
            for launch in replay(call, sm_count):
                launches += 1
                for config in configs(launch, step in all_config_steps):
                    installation, rest = cache_key(launch, config, target)
                    name = entry_name(installation + rest)
                    needed[name] = None
                    if name not in entries:
                        entries[name] = {
                            "rest": rest,
                            "kernel": launch.name,
                            "launch": launch,
                            "config": config,
                            "launcher": launcher_digest(launch, config, target),
                        }
        steps[step] = {"calls": len(calls), "launches": launches, "entries": list(needed)}
    return entries, steps


def build(out: pathlib.Path, entries: dict, steps: dict, arch: int, log=print) -> dict:
    """Compiles every planned entry for sm_<arch> into ``out`` (kept: JSON and cubin) and
    writes the manifest; returns it. Entries already in ``out`` (same name, same Triton
    build) are kept, not recompiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.cache import triton_key

    from ..cost_model.triton_compile import compile_launch

    target = GPUTarget("cuda", arch, 32)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out)
    kept = (
        previous.get("entries", {}) if previous.get("installation") == digest(triton_key()) else {}
    )
    (out / "entries").mkdir(exist_ok=True)
    manifest_entries = {}
    saved_dir = triton.knobs.cache.dir
    with tempfile.TemporaryDirectory() as scratch:
        triton.knobs.cache.dir = scratch
        try:
            for n, (name, entry) in enumerate(
                sorted(entries.items(), key=lambda e: e[1]["kernel"])
            ):
                folder = out / "entries" / name
                if name in kept and folder.is_dir():
                    manifest_entries[name] = {**kept[name], "launcher": entry["launcher"]}
                    continue
                t0, cpu0 = time.perf_counter(), _cpu_seconds()
                compiled = compile_launch(entry["launch"], entry["config"], target)
                seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
                folder.mkdir(exist_ok=True)
                files = []
                for path in compiled.metadata_group.values():
                    path = pathlib.Path(path)
                    if path.suffix in KEEP_SUFFIXES and not path.name.startswith("__grp__"):
                        shutil.copyfile(path, folder / path.name)
                        files.append(path.name)
                manifest_entries[name] = {
                    "rest": entry["rest"],
                    "kernel": entry["kernel"],
                    "config": {
                        **entry["config"].kwargs,
                        "num_warps": entry["config"].num_warps,
                        "num_stages": entry["config"].num_stages,
                    },
                    "files": sorted(files),
                    "launcher": entry["launcher"],
                    "compile_s": round(seconds, 2),
                    "compile_cpu_s": round(cpu, 2),
                }
                log(f"  [{n + 1}/{len(entries)}] {entry['kernel']} {seconds:.1f}s ({cpu:.1f}s CPU)")
        finally:
            triton.knobs.cache.dir = saved_dir
    for stale in set(p.name for p in (out / "entries").iterdir()) - set(manifest_entries):
        shutil.rmtree(out / "entries" / stale)
    manifest = {
        "triton": triton.__version__,
        "installation": digest(triton_key()),
        "arch": arch,
        "backend": make_backend(target).hash(),
        "sources": source_fingerprint(),
        "entries": manifest_entries,
        "steps": steps,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    import resource

    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(folder: pathlib.Path) -> dict:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def install_problem(
    manifest: dict, triton_version: str, arch: int | None, backend_hash: str | None
) -> str:
    """Why the carried cache cannot serve this machine ("" when it can): a different
    Triton release, GPU arch or ptxas. ``arch`` None: no GPU."""
    if not manifest:
        return "no carried Triton cache (no manifest)"
    if triton_version != manifest["triton"]:
        return f"built with Triton {manifest['triton']}, this machine has {triton_version}"
    if arch is None:
        return "no GPU"
    if arch != manifest["arch"]:
        return f"built for {arch_name(manifest['arch'])}, this GPU is {arch_name(arch)}"
    if backend_hash != manifest["backend"]:
        return f"built with ptxas/arch {manifest['backend']}, this Triton has {backend_hash}"
    return ""


def install(carried: pathlib.Path, cache_dir: pathlib.Path, installation: str) -> int:
    """Copies every carried entry into ``cache_dir`` under the name this machine's Triton
    (whose ``triton_key()`` is ``installation``) gives it, with its group file; records
    the installed names in ``cache_dir/casa_carried.json``; returns how many."""
    manifest = read_manifest(carried)
    cache_dir.mkdir(parents=True, exist_ok=True)
    installed = []
    for old, entry in manifest["entries"].items():
        key = installation + entry["rest"]
        name = entry_name(key)
        folder = cache_dir / name
        folder.mkdir(exist_ok=True)
        group = {}
        for file in entry["files"]:
            target = folder / file
            if file.endswith(".json"):
                metadata = json.loads((carried / "entries" / old / file).read_text())
                metadata["hash"] = digest(key)
                target.write_text(json.dumps(metadata))
            else:
                shutil.copyfile(carried / "entries" / old / file, target)
            group[file] = str(target.resolve())
        metadata_file = next(f for f in entry["files"] if f.endswith(".json"))
        (folder / f"__grp__{metadata_file}").write_text(json.dumps({"child_paths": group}))
        installed.append(name)
    (cache_dir / INSTALLED).write_text(json.dumps(sorted(installed)) + "\n")
    return len(installed)


def device_compiles(cache_dir: pathlib.Path) -> tuple[int, int, list[str]]:
    """``(kernels, launchers, names)``: the entries in ``cache_dir`` that were not
    installed from the carried cache, i.e. compiled on this machine — kernels (a cubin)
    and launcher modules (a shared object) — and the compiled kernels' names."""
    installed = (
        set(json.loads((cache_dir / INSTALLED).read_text()))
        if (cache_dir / INSTALLED).is_file()
        else set()
    )
    kernels, launchers, names = 0, 0, []
    if not cache_dir.is_dir():
        return 0, 0, []
    for folder in sorted(p for p in cache_dir.iterdir() if p.is_dir() and p.name not in installed):
        files = [f.name for f in folder.iterdir()]
        cubins = [f for f in files if f.endswith(".cubin")]
        if cubins:
            kernels += 1
            names += [f.removesuffix(".cubin") for f in cubins]
        elif any(f.endswith(".so") for f in files):
            launchers += 1
    return kernels, launchers, sorted(names)


def size_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
