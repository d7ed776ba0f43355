"""``python -m bench.triton_aot COMMAND`` (from the repository root):

* ``record-tests FILE`` — runs the tests-triton step's tests under the Triton interpreter
  (any Triton release; needs pytest) and writes the launcher calls they make to FILE.
* ``build OUT [--test-python PY | --test-calls FILE] [--no-tests] [--plan-only] [--sm-count 132] [--arch 90]`` — with the
  Triton release of the GPU machine (3.6.0 for the H200 image) and the interpreter off:
  plans the kernels every device_check step launches and compiles the missing ones into
  OUT (kept: OUT's entries that this Triton built and the plan still needs); prints per
  step the calls, launches and compiles it needs, and the folder's size. The tests'
  calls are recorded by running them under the interpreter with ``--test-python``
  (default: this Python; it needs pytest), or read from FILE (JSON lines, as
  :mod:`.calls` records them).
* ``install CARRIED CACHE_DIR [--dry-run]`` — on the GPU machine: re-keys CARRIED's
  entries into CACHE_DIR (the run's ``TRITON_CACHE_DIR``) when its Triton, GPU arch and
  ptxas match the build's; otherwise installs nothing, says why, and the kernels compile
  there. Exit 0 either way (2: bad arguments).
* ``precompile CARRIED`` — the fallback, on the GPU machine where ``install`` installed
  nothing: plans the steps' kernels there (the tests' from CARRIED/test_calls.jsonl when
  carried) and compiles them into ``TRITON_CACHE_DIR`` with one process per core
  (MAX_JOBS). Exit 1 when a kernel failed to compile.
* ``compiled CACHE_DIR`` — what that machine compiled itself (kernels, launcher modules).

Every output line starts with ``triton cache:``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

PREFIX = "triton cache:"
TEST_CALLS = "test_calls.jsonl"  # in the built folder: the tests' calls, for the fallback


def _build(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            f"{PREFIX} unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr
        )
        return 2
    # Every autotune config must stay visible (bench-autotuned compiles them all).
    os.environ.pop("CASA_TRITON_SINGLE_CONFIG", None)
    import triton

    from . import cache, steps

    calls = steps.step_calls(None if args.no_tests else args.test_python, args.test_calls)
    entries, plan = cache.plan(calls, steps.ALL_CONFIG_STEPS, args.sm_count, args.arch)
    print(
        f"{PREFIX} Triton {triton.__version__}, {cache.arch_name(args.arch)}: "
        f"{len(entries)} kernels to carry",
        flush=True,
    )
    if args.plan_only:
        print(step_table({"entries": entries, "steps": plan}))
        return 0
    manifest = cache.build(
        args.out, entries, plan, args.arch, log=lambda line: print(line, flush=True)
    )
    if "tests-triton" in calls:
        (args.out / TEST_CALLS).write_text(
            "".join(c.to_json() + "\n" for c in calls["tests-triton"])
        )
    print(step_table(manifest))
    size = cache.size_bytes(args.out)
    print(f"{PREFIX} {args.out}: {len(manifest['entries'])} kernels, {size / 2**20:.1f} MiB")
    return 0


def step_table(manifest: dict) -> str:
    """Per step, in run order: calls, launches, the kernels it compiles on a cold GPU
    machine (all; new: not compiled by an earlier step, which the disk cache keeps), the
    compile seconds those new ones took here (when built), and the launcher modules (gcc)."""
    entries = manifest["entries"]
    lines = [
        f"{'step':<16} {'calls':>5} {'launches':>8} {'kernels':>7} {'new':>4} "
        f"{'new s here':>10} {'launchers':>9} {'new':>4}"
    ]
    seen: set[str] = set()
    seen_launchers: set[str] = set()
    for step, row in manifest["steps"].items():
        new = [e for e in row["entries"] if e not in seen]
        seen |= set(new)
        launchers = {entries[e]["launcher"] for e in row["entries"]} - {None}
        new_launchers = launchers - seen_launchers
        seen_launchers |= launchers
        lines.append(
            f"{step:<16} {row['calls']:>5} {row['launches']:>8} {len(row['entries']):>7} "
            f"{len(new):>4} {_seconds(entries, new):>10} "
            f"{len(launchers):>9} {len(new_launchers):>4}"
        )
    lines.append(
        f"{'all':<16} {'':>5} {'':>8} {len(entries):>7} {'':>4} {_seconds(entries, entries):>10} "
        f"{len(seen_launchers):>9}"
    )
    return "\n".join(lines)


def _record_tests(args) -> int:
    from . import steps

    calls = steps.recorded_test_calls()
    args.file.parent.mkdir(parents=True, exist_ok=True)
    args.file.write_text("".join(call.to_json() + "\n" for call in calls))
    print(f"{PREFIX} {len(calls)} distinct calls of {' '.join(steps.TESTS_TRITON)} in {args.file}")
    return 0


def _seconds(entries: dict, names) -> str:
    times = [entries[n].get("compile_s") for n in names]
    return "-" if None in times else f"{sum(times):.0f}"


def _install(args) -> int:
    from . import cache

    manifest = cache.read_manifest(args.carried)
    if not manifest:
        print(f"{PREFIX} none carried ({args.carried} has no manifest): kernels compile here")
        return 0
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.cache import triton_key
    except Exception as error:  # noqa: BLE001 - the reason is reported
        print(f"{PREFIX} not installed: triton does not import ({type(error).__name__}: {error})")
        return 0
    arch = backend_hash = sm_count = None
    if not args.dry_run:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            arch, sm_count = 10 * props.major + props.minor, props.multi_processor_count
            backend_hash = make_backend(GPUTarget("cuda", arch, 32)).hash()
    problem = cache.install_problem(manifest, triton.__version__, arch, backend_hash)
    stale = manifest["sources"] != cache.source_fingerprint()
    note = (
        "; the kernels' sources changed since it was built: changed kernels compile here"
        if stale
        else ""
    )
    if problem:
        print(f"{PREFIX} not installed ({problem}): kernels compile here{note}")
        return 0
    count = cache.install(args.carried, args.cache_dir, triton_key())
    rekeyed = manifest["installation"] != cache.digest(triton_key())
    how = "re-keyed for this Triton build" if rekeyed else "same Triton build"
    print(
        f"{PREFIX} installed {count} kernels (Triton {manifest['triton']}, "
        f"{cache.arch_name(manifest['arch'])}, "
        f"{how}){note}"
    )
    print(f"{PREFIX} {probe_line(args.cache_dir, arch, sm_count)}")
    return 0


def probe_line(cache_dir: pathlib.Path, arch: int, sm_count: int) -> str:
    """Whether the kernels verify's calls launch on this GPU, keyed here, were installed:
    the check that this machine's keys (environment, SM count, sources) match."""
    from . import cache, steps

    entries, _ = cache.plan({"verify": steps.verify_calls()}, set(), sm_count, arch)
    found = sum((cache_dir / name).is_dir() for name in entries)
    if found == len(entries):
        return f"all {found} kernels verify launches here are among them"
    return (
        f"only {found} of the {len(entries)} kernels verify launches here are among them "
        "(this machine keys them differently): kernels compile here"
    )


def _precompile(args) -> int:
    os.environ.pop("CASA_TRITON_SINGLE_CONFIG", None)  # before the kernels are imported
    from . import precompile

    failed = precompile.precompile(
        args.carried / TEST_CALLS, precompile.jobs(), log=lambda line: print(line, flush=True)
    )
    return 1 if failed else 0


def _compiled(args) -> int:
    from . import cache

    kernels, launchers, names = cache.device_compiles(args.cache_dir)
    counts = {n: names.count(n) for n in sorted(set(names))}
    detail = ", ".join(f"{n} ×{c}" for n, c in counts.items())
    print(
        f"{PREFIX} compiled here: {kernels} kernels{f' ({detail})' if detail else ''}, "
        f"{launchers} launcher modules"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.triton_aot", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("record-tests")
    p.add_argument("file", type=pathlib.Path)
    p = sub.add_parser("build")
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--test-python", default=sys.executable)
    p.add_argument(
        "--test-calls", default=None, help="the tests' calls recorded before (JSON lines)"
    )
    p.add_argument("--no-tests", action="store_true", help="leave out the tests' calls")
    p.add_argument(
        "--plan-only", action="store_true", help="print what each step compiles; compile nothing"
    )
    p.add_argument("--sm-count", type=int, default=132)
    p.add_argument("--arch", type=int, default=90)
    p = sub.add_parser("install")
    p.add_argument("carried", type=pathlib.Path)
    p.add_argument("cache_dir", type=pathlib.Path)
    p.add_argument("--dry-run", action="store_true", help="check the manifest, assume no GPU")
    p = sub.add_parser("precompile")
    p.add_argument("carried", type=pathlib.Path)
    p = sub.add_parser("compiled")
    p.add_argument("cache_dir", type=pathlib.Path)
    args = parser.parse_args(argv)
    commands = {
        "record-tests": _record_tests,
        "build": _build,
        "install": _install,
        "precompile": _precompile,
        "compiled": _compiled,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
