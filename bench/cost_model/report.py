"""The cost model's readable table (estimate.md): assumptions, then per backend and
batch size one row per kernel and the total against the compute and HBM floors."""

from __future__ import annotations

from .hardware import Gpu


def assumptions(gpu: Gpu) -> str:
    return (
        f"{gpu.name}: {gpu.sms} SMs at {gpu.clock_ghz} GHz, {gpu.tensor_tflops:.0f} TFLOP/s dense "
        f"bf16/fp16 through wgmma (mma.sync at {gpu.mma_sync_fraction:.0%} of it), "
        f"{gpu.fp32_tflops:.0f} TFLOP/s fp32 FMA, {gpu.hbm_tb_s} TB/s HBM, "
        f"{gpu.launch_us} µs per launch. A waited-on round of global loads costs "
        f"{gpu.load_latency_cycles:.0f} cycles ±{gpu.latency_error:.0%} (the range in "
        "brackets); loads per round from the SASS (loads issued before the first use of "
        "one); async copies (cp.async/TMA) in a ≥ 2-stage pipeline cost only its fill. "
        "A program's time is its load rounds plus its MMA cycles; programs on one SM "
        "overlap their latencies but share its math units; a launch takes max(waves × "
        "wave time, compulsory HBM bytes / bandwidth) plus the launch overhead. "
        "Instruction counts and the TC share columns are static (instructions in the code, "
        'not executed); "TC executed" is the tensor-core share of the math instructions a '
        "warp executes, loops weighted by the plan's trip counts (an approximation, see "
        "§15; in brackets with every loop run once; cuda only); GFLOP are executed (padding "
        "and recomputation included)."
    )


def _executed(row: dict) -> str:
    """The executed tensor-core share, ``lower [loops once]``, or ``–`` where not computed."""
    if "executed_tensor_core_share" not in row:
        return "–"
    lower, once = row["executed_tensor_core_share"]
    return f"{lower:.0%} [{once:.0%}]"


def _table(entry: dict) -> list[str]:
    lines = [
        "| kernel | grid | blocks/SM | waves | regs | smem KiB | spill B | TC share (math / all) "
        "| TC executed | LDG B × in flight | async | GFLOP | HBM MB | load rounds | bound "
        "| est. µs [range] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in entry["kernels"].items():
        mix = r["mix"]
        grid = "×".join(str(g) for g in r["grid"] if g != 1) or "1"
        lines.append(
            f"| {name} | {grid} = {r['programs']} | {r['blocks_per_sm']} | {r['waves']} "
            f"| {r['registers']} | {r['shared_bytes'] / 1024:.1f} | {r['local_bytes']} "
            f"| {r['tensor_core_share']:.0%} / {r['tensor_core_of_all']:.1%} "
            f"| {_executed(r)} | {mix['sync_load_bytes']:g} × {mix['loads_in_flight']:g} | {mix['async_copies']} "
            f"| {r['flops'] / 1e9:.2f} | {r['hbm_bytes'] / 1e6:.1f} | {r['latency_rounds']:g} "
            f"| {r['bound']} | {r['us']:.1f} [{r['us_low']:.1f}–{r['us_high']:.1f}] |"
        )
    lines.append(
        f"| **total** ({entry['launches']} launches, {entry['compiler']}) | | | | | | | | | | "
        f"| {entry['flops'] / 1e9:.2f} | | | | **{entry['total_us']:.0f}** "
        f"[{entry['total_us_low']:.0f}–{entry['total_us_high']:.0f}] |"
    )
    lines.append("")
    lines.append(
        f"Floors: compute {entry['compute_floor_us']} µs ({entry['useful_flops'] / 1e9:.2f} useful "
        f"GFLOP), HBM {entry['hbm_floor_us']} µs; the estimate is "
        f"{entry['total_us'] / max(entry['compute_floor_us'], entry['hbm_floor_us']):.0f}× the "
        "higher floor."
    )
    return lines


def markdown(gpu: Gpu, shape, dtype: str, result: dict, others: dict, notes, elapsed_s) -> str:
    n, d, k = shape
    lines = [
        f"# Static GPU cost model: ESTIMATES for N={n}, D={d}, k={k}, {dtype}",
        "",
        "Estimates from compiled code read without a GPU (`python -m bench estimate`), never "
        "measurements; see docs/design.md §15.",
        "",
        "Model: " + assumptions(gpu),
        "",
    ]
    for backend, per_batch in result.items():
        for batch, entry in per_batch.items():
            lines += [f"## {backend}, B={batch}", "", *_table(entry), ""]
    for label, per_batch in others.items():
        lines += [f"## {label} (for comparison)", ""]
        for batch, entry in per_batch.items():
            kernels = ", ".join(f"{name} {r['us']:.1f}" for name, r in entry["kernels"].items())
            lines.append(f"- B={batch}: total {entry['total_us']:.0f} µs ({kernels})")
        lines.append("")
    for note in notes:
        lines.append(f"Note: {note}")
    lines.append(f"Took {elapsed_s:.0f} s (compiles included).")
    return "\n".join(lines) + "\n"
