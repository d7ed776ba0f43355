"""The static GPU cost model (bench/cost_model): SASS and resource parsing on recorded
cuobjdump output, the occupancy and wave arithmetic, the time estimate's arithmetic,
the op's floors, the executed tensor-core share, the CUDA launch plan's tail tile width
(its small plan program, built with the host compiler) and the launch capture of the
triton backend. Nothing here compiles a kernel; ``python -m bench estimate`` (run in CI)
does."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench.cost_model import cuda_side, model, sass
from bench.cost_model.cuda_side import _function, _taps
from bench.cost_model.hardware import Gpu
from bench.cost_model.occupancy import blocks_per_sm, waves
from bench.cost_model.timing import Compiled, KernelWork, estimate, latency_rounds

# Recorded from `cuobjdump -sass` of the kernels compiled for sm_90a (abridged: the
# control-code lines dropped where they add nothing).
GATHER_INTO_SHARED = """
        /*1260*/                   VIADD R128, R124, 0x1c ;
        /*1270*/               @P3 LDG.E.U16 R47, desc[UR54][R28.64+-0x2] ;
        /*1280*/                   STS.U16 [R116+UR51+0x1000], R47 ;
        /*1290*/               @P5 LDG.E.U16 R51, desc[UR54][R28.64+-0x2] ;
        /*12a0*/                   STS.U16 [R116+UR51+0x1800], R51 ;
        /*12b0*/               @!P4 LDG.E.U16.CONSTANT R49, desc[UR54][R26.64] ;
        /*12c0*/                   BSYNC B1 ;
        /*12d0*/                   STS.U16 [R116+UR51+0x1400], R49 ;
"""
LOADS_BACK_TO_BACK = """
        /*1270*/               @P3 LDG.E.U16 R47, desc[UR54][R28.64+-0x2] ;
        /*1280*/                   PRMT R60, RZ, 0x7610, R60 ;
        /*1290*/               @P5 LDG.E.U16 R51, desc[UR54][R28.64+-0x2] ;
        /*13a0*/               @P4 LDG.E.U16 R49, desc[UR54][R26.64+-0x2] ;
        /*13d0*/               @P5 LDG.E.U16 R53, desc[UR54][R32.64+-0x2] ;
        /*1790*/                   STS.U16 [R116+UR51+0x1000], R47 ;
        /*17a0*/                   STS.U16 [R116+UR51+0x1800], R51 ;
        /*17b0*/                   STS.U16 [R116+UR51+0x1400], R49 ;
        /*17c0*/                   STS.U16 [R116+UR51+0x1c00], R53 ;
"""
MATH_AND_COPIES = """
        /*05a0*/                   LDG.E.64 R2, desc[UR6][R8.64] ;
        /*05b0*/                   IMAD R4, R3, 0x2, RZ ;
        /*9df0*/               @P6 LDGSTS.E.LTC128B.128 [R0+0x10c00], desc[UR6][R4.64] ;
        /*8770*/                   HMMA.16816.F32.BF16 R16, R48, R54.reuse, R16 ;
        /*19f0*/                   HGMMA.64x32x16.F32.BF16 R40, gdesc[UR28].tnspB, R40 ;
        /*8eb0*/                   FFMA.SAT R7, -R5, R4, 0.5 ;
        /*8ec0*/                   FMUL R7, R7, R7 ;
        /*8ed0*/                   LDS.128 R8, [R90+0x2000] ;
        /*18a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*18b0*/                   EXIT ;
"""
_PREFIX = "_ZN4casa3gpu59_GLOBAL__N__score_attention_kernels_cu_"
RES_USAGE = f"""
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:88
 Function {_PREFIX}11head_kernelIN7cutlass10bfloat16_tELi3EEEvNS1_8ConvArgsIT_EE:
  REG:128 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {_PREFIX}11head_kernelIN7cutlass10bfloat16_tELi5EEEvNS1_8ConvArgsIT_EE:
  REG:96 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {_PREFIX}11head_kernelIfLi3EEEvNS1_8ConvArgsIT_EE:
  REG:168 STACK:8 SHARED:1024 LOCAL:24 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {_PREFIX}11conv_kernelIN7cutlass10bfloat16_tELi3ELb0ELb0EEEvNS1_8ConvArgsIT_EE:
  REG:76 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {_PREFIX}11conv_kernelIN7cutlass10bfloat16_tELi3ELb1ELb0EEEvNS1_8ConvArgsIT_EE:
  REG:72 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {_PREFIX}11conv_kernelIN7cutlass10bfloat16_tELi3ELb0ELb1EEEvNS1_8ConvArgsIT_EE:
  REG:90 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {_PREFIX}17tail_merge_kernelEPK6float2PS2_iii:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:572 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


# --- SASS ---------------------------------------------------------------------------


def test_instructions_keep_opcode_modifiers_and_operands_past_predicates():
    code = sass.instructions(GATHER_INTO_SHARED)
    assert [i.opcode for i in code] == ["VIADD", "LDG", "STS", "LDG", "STS", "LDG", "BSYNC", "STS"]
    assert code[5].modifiers == ("E", "U16", "CONSTANT")
    assert code[1].operands == "R47, desc[UR54][R28.64+-0x2]"


def test_a_load_used_before_the_next_is_issued_is_one_load_in_flight():
    assert sass.loads_in_flight(sass.instructions(GATHER_INTO_SHARED)) == 1.0


def test_loads_issued_back_to_back_are_in_flight_together():
    # The PRMT between the loads reads no loaded register, so the group stays open.
    assert sass.loads_in_flight(sass.instructions(LOADS_BACK_TO_BACK)) == 4.0


def test_a_vector_load_group_closes_on_the_use_of_any_register_it_fills():
    code = sass.instructions(
        """
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R12, desc[UR4][R4.64] ;
        /*0030*/                   FADD R20, R11, R1 ;
        /*0040*/                   LDG.E R16, desc[UR4][R6.64] ;
        /*0050*/                   FADD R21, R16, R1 ;
        """
    )
    # Groups {R8..R11, R12..R15} (closed by the read of R11) and {R16}: 3 loads, 2 groups.
    assert sass.loads_in_flight(code) == 1.5
    assert [sass.load_bytes(i) for i in code if i.opcode == "LDG"] == [16, 16, 4]


def test_loads_in_flight_per_width_follow_the_groups_of_that_width():
    # 16-byte loads back to back (one group of 3) and 2-byte loads used one at a time
    # (3 groups of 1): 6 loads in 4 groups on average, 3 and 1 per width.
    code = sass.instructions(
        """
        /*0010*/                   LDG.E.128.STRONG.GPU R8, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128.STRONG.GPU R12, desc[UR4][R2.64+0x800] ;
        /*0030*/                   LDG.E.128.STRONG.GPU R16, desc[UR4][R2.64+0x1000] ;
        /*0040*/                   FADD R20, R8, R12 ;
        /*0050*/                   LDG.E.U16 R21, desc[UR4][R4.64] ;
        /*0060*/                   FADD R22, R21, R1 ;
        /*0070*/                   LDG.E.U16 R23, desc[UR4][R4.64+0x2] ;
        /*0080*/                   FADD R24, R23, R1 ;
        /*0090*/                   LDG.E.U16 R25, desc[UR4][R4.64+0x4] ;
        /*00a0*/                   FADD R26, R25, R1 ;
        """
    )
    assert sass.loads_in_flight(code) == 1.5
    assert sass.in_flight_by_width(code) == ((16, 3.0), (2, 1.0))


def test_no_loads_count_as_one_in_flight():
    assert sass.loads_in_flight(sass.instructions("/*0010*/ FFMA R1, R2, R3, R4 ;")) == 1.0


def test_instruction_mix_counts_tensor_core_math_loads_and_async_copies():
    mix = sass.instruction_mix(MATH_AND_COPIES)
    assert (mix.total, mix.tensor_core, mix.wgmma, mix.fp_math) == (10, 2, 1, 2)
    assert (mix.sync_loads, mix.async_copies, mix.shared_loads, mix.barriers) == (1, 1, 1, 1)
    assert mix.sync_load_bytes == 8.0
    assert mix.tensor_core_share == 0.5 and mix.tensor_core_of_all == 0.2
    assert sass.InstructionMix.from_dict(mix.as_dict()) == dataclasses.replace(
        mix, sync_load_bytes=8.0, loads_in_flight=1.0
    )


def test_split_functions_and_resources_by_mangled_name():
    text = (
        "\tcode for sm_90a\n\t\tFunction : first_kernel\n"
        + GATHER_INTO_SHARED
        + "\t\tFunction : second_kernel\n"
        + MATH_AND_COPIES
    )
    functions = sass.split_functions(text)
    assert list(functions) == ["first_kernel", "second_kernel"]
    assert sass.instruction_mix(functions["second_kernel"]).tensor_core == 2
    resources = sass.parse_resources(RES_USAGE)
    assert len(resources) == 7
    bf16 = _function(resources, "head_kernel", "bfloat16", 3)
    fp32 = _function(resources, "head_kernel", "float32", 3)
    assert resources[bf16] == sass.Resources(registers=128, stack=0, shared=1024, local=0)
    assert resources[fp32] == sass.Resources(registers=168, stack=8, shared=1024, local=24)
    assert resources[_function(resources, "head_kernel", "bfloat16", 5)].registers == 96
    # The conv kernel: by kernel size, by stride-2 / transposed and by split-K.
    conv = {
        flags: resources[_function(resources, "conv_kernel", "bfloat16", 3, flags)].registers
        for flags in [(False, False), (True, False), (False, True)]
    }
    assert conv == {(False, False): 76, (True, False): 72, (False, True): 90}
    assert resources[_function(resources, "tail_merge_kernel", "bfloat16", 3)].registers == 32
    with pytest.raises(ValueError, match="conv_kernel"):
        _function(resources, "conv_kernel", "bfloat16", 7, (False, False))
    with pytest.raises(ValueError, match="tail_output_kernel"):
        _function(resources, "tail_output_kernel", "bfloat16", 3)


def test_tail_kernels_are_told_apart_by_their_tile_width():
    text = "".join(
        f" Function {_PREFIX}{name}IN7cutlass10bfloat16_tELi{k}ELi{cols}EEEvNS1_8TailArgsIT_EE:\n"
        f"  REG:{regs} STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:608\n"
        for name, k, cols, regs in [
            ("17tail_stats_kernel", 3, 128, 122),
            ("17tail_stats_kernel", 3, 64, 100),
            ("17tail_stats_kernel", 1, 64, 90),
        ]
    )
    resources = sass.parse_resources(text)
    assert (
        resources[_function(resources, "tail_stats_kernel", "bfloat16", 3, (), 128)].registers
        == 122
    )
    assert (
        resources[_function(resources, "tail_stats_kernel", "bfloat16", 3, (), 64)].registers == 100
    )
    with pytest.raises(ValueError, match="tail_stats_kernel"):
        _function(resources, "tail_stats_kernel", "bfloat16", 3)  # width not given


# --- executed tensor-core share ----------------------------------------------------------

# One MMA before a loop, a K loop with one MMA and one FFMA, then an epilogue loop of two
# FP instructions, one FADD outside any loop, and a nested loop inside the epilogue loop.
LOOPS = """
        /*0000*/                   HMMA.16816.F32.BF16 R0, R4, R8, R0 ;
        /*0010*/                   FADD R1, R2, R3 ;
        /*0020*/                   HMMA.16816.F32.BF16 R0, R4, R8, R0 ;
        /*0030*/                   FFMA R9, R9, R2, R3 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FMUL R6, R6, R7 ;
        /*0060*/                   FADD R6, R6, R7 ;
        /*0070*/                   FMUL R10, R10, R7 ;
        /*0080*/               @P2 BRA 0x70 ;
        /*0090*/               @P1 BRA 0x50 ;
        /*00a0*/                   BRA 0xb0 ;
        /*00b0*/                   EXIT ;
"""


def test_loops_are_the_backward_branches():
    found = sass.loops(sass.addressed_instructions(LOOPS))
    # the forward branch to 0xb0 is no loop
    assert found == [sass.Loop(0x20, 0x40), sass.Loop(0x70, 0x80), sass.Loop(0x50, 0x90)]


@pytest.mark.parametrize("mma_trips, trips", [(1, 1), (4, 1), (4, 8), (16, 3)])
def test_the_executed_share_weights_each_loop_by_its_trip_count(mma_trips, trips):
    # 40 MMAs per warp (from the MACs); FP: the FADD once, the K loop's FFMA mma_trips
    # times, the epilogue loop's two trips times, the nested loop's FMUL trips² times.
    macs, warps = 40 * 16 * 8 * 16 * 4, 4
    share = sass.executed_tensor_core_share(LOOPS, macs, warps, mma_trips, trips)
    fp = 1 + mma_trips + 2 * trips + trips * trips
    assert share == pytest.approx(40 / (40 + fp))


def test_a_longer_loop_lowers_the_executed_share_and_no_mma_gives_zero():
    macs, warps = 40 * 2048 * 4, 4
    short = sass.executed_tensor_core_share(LOOPS, macs, warps, 4, 2)
    long = sass.executed_tensor_core_share(LOOPS, macs, warps, 4, 64)
    assert long < 0.5 < short
    without_mma = "\n".join(line for line in LOOPS.splitlines() if "HMMA" not in line)
    assert sass.executed_tensor_core_share(without_mma, macs, warps, 4, 2) == 0.0


def test_wgmma_macs_count_at_the_warpgroup_instructions_shape():
    # The K loop's second MMA a wgmma of 64 x 32 x 16: 8192 multiply-adds per warp of the
    # warpgroup, four times an HMMA.16816's 2048.
    mixed = LOOPS.replace(
        "/*0020*/                   HMMA.16816.F32.BF16 R0, R4, R8, R0 ;",
        "/*0020*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;",
    )
    warps, mma_trips, trips = 4, 4, 2
    fp = 1 + mma_trips + 2 * trips + trips * trips
    hmma_macs, wgmma_macs = 10 * 2048 * warps, 30 * 8192 * warps  # 10 HMMA, 30 HGMMA per warp
    share = sass.executed_tensor_core_share(
        mixed, hmma_macs + wgmma_macs, warps, mma_trips, trips, wgmma_macs=wgmma_macs
    )
    assert share == pytest.approx(40 / (40 + fp))
    # Undescribed, every multiply-add counts at the HMMA's shape; HGMMA alone, at its own.
    assert sass.executed_tensor_core_share(
        mixed, hmma_macs + wgmma_macs, warps, mma_trips, trips
    ) == pytest.approx(130 / (130 + fp))
    only_wgmma = mixed.replace("HMMA.16816.F32.BF16 R0, R4, R8, R0", "NOP")
    assert sass.executed_tensor_core_share(
        only_wgmma, wgmma_macs, warps, mma_trips, trips
    ) == pytest.approx(30 / (30 + fp))


# --- the CUDA launch plan ------------------------------------------------------------------

TAIL_WIDTHS = (128, 64)  # csrc/cuda/launch_plan.h kTailColOptions


@pytest.mark.parametrize(
    "batch, n_vars, d_model, sms",
    [(16, 862, 512, 132), (8, 862, 512, 132), (1, 862, 512, 132), (4, 300, 256, 20), (2, 5, 8, 1)],
)
def test_the_tail_tile_width_minimises_the_slots_computed(tmp_path, batch, n_vars, d_model, sms):
    # The plan's width has the least ⌈CTAs / resident⌉ · tile area among the widths, ties
    # to the wider; the tail launches' grids follow it.
    if cuda_side.shutil.which("g++") is None and not cuda_side.os.environ.get("CXX"):
        pytest.skip("no C++ compiler for the launch-plan program")
    plan = cuda_side.launch_plan(tmp_path, "bfloat16", batch, n_vars, d_model, 3, sms)
    rows, cols = plan["tiles"]["tail"]
    resident = 2 * sms  # kTailBlocksPerSm

    def blocks(width):
        return math.ceil(d_model / width) * math.ceil(n_vars / rows) * batch

    def cost(width):
        return math.ceil(blocks(width) / resident) * rows * width

    best = min(cost(w) for w in TAIL_WIDTHS)
    assert cols == next(w for w in TAIL_WIDTHS if cost(w) == best)
    grids = {launch["name"]: launch["blocks"] for launch in plan["launches"]}
    assert grids["tail_stats"] == grids["tail_output"] == blocks(cols)


def test_the_traffic_plan_narrows_the_tail_tiles_at_b16_only_where_it_cuts_a_wave(tmp_path):
    if cuda_side.shutil.which("g++") is None and not cuda_side.os.environ.get("CXX"):
        pytest.skip("no C++ compiler for the launch-plan program")
    widths = {
        b: cuda_side.launch_plan(tmp_path, "bfloat16", b, 862, 512, 3, 132)["tiles"]["tail"][1]
        for b in (16, 8)
    }
    # B=16: 896 wide CTAs are 4 waves of 264, 1792 narrow ones 7 half-size waves;
    # B=8: 448 wide CTAs are 2 waves, 896 narrow ones 4 half-size waves, a tie.
    assert widths == {16: 64, 8: 128}


# --- occupancy ----------------------------------------------------------------------

GPU = Gpu()


@pytest.mark.parametrize(
    "threads, registers, shared, expected",
    [
        # 130 registers round to 136 per thread: 4352 per warp, 8 warps = 34816 > 65536 / 2
        (256, 130, 17 * 1024, 1),
        (256, 128, 41 * 1024, 2),  # 4096 per warp x 8 warps: exactly two
        (128, 64, 21 * 1024, 8),  # registers allow 8, shared memory 10
        (256, 96, 98 * 1024, 2),  # shared memory: 228 KiB // 98 KiB
        (256, 102, 128 * 1024, 1),
        (1024, 32, 0, 2),  # threads: 2048 per SM
        (32, 16, 0, 32),  # the 32-block limit
        (256, 64, 228 * 1024 + 1, 0),  # over the per-block maximum: does not fit
    ],
)
def test_blocks_per_sm_follow_registers_shared_memory_threads_and_blocks(
    threads, registers, shared, expected
):
    assert blocks_per_sm(GPU, threads=threads, registers=registers, shared_bytes=shared) == expected


def test_waves_round_up_over_all_sms():
    assert waves(GPU, 288, 2) == 2  # 288 > 2 x 132
    assert waves(GPU, 264, 2) == 1
    assert waves(GPU, 896, 1) == 7
    assert waves(GPU, 0, 1) == 0
    with pytest.raises(ValueError, match="resident"):
        waves(GPU, 10, 0)
    with pytest.raises(ValueError, match="threads"):
        blocks_per_sm(GPU, threads=0, registers=32, shared_bytes=0)


# --- the time estimate ----------------------------------------------------------------


def _mix(**kw) -> sass.InstructionMix:
    base = dict(
        total=100,
        tensor_core=10,
        wgmma=0,
        fp_math=0,
        sync_loads=10,
        async_copies=0,
        shared_loads=0,
        shared_stores=0,
        barriers=0,
        sync_load_bytes=2.0,
        loads_in_flight=1.0,
    )
    return sass.InstructionMix(**{**base, **kw})


def _work(**kw) -> KernelWork:
    base = dict(
        name="k",
        grid=288,
        threads=256,
        phases=((9, 256 * 32 * 2),),  # 9 steps, 32 two-byte loads per thread each
        macs=0.0,
        flops=0.0,
        hbm_bytes=0.0,
    )
    return KernelWork(**{**base, **kw})


def test_latency_rounds_divide_each_steps_loads_by_the_loads_in_flight():
    assert latency_rounds(_work(), _mix()) == 9 * 32
    assert latency_rounds(_work(), _mix(loads_in_flight=16.0)) == 9 * 2
    # A step waits at least once, however few its loads.
    assert latency_rounds(_work(phases=((9, 256 * 2),)), _mix(loads_in_flight=16.0)) == 9


def test_a_phase_of_one_load_width_is_priced_at_that_widths_loads_in_flight():
    # 64 KiB per step over 256 threads: 16 sixteen-byte loads per thread. With the
    # kernel's means (2-byte loads one at a time) that is 128 rounds; at the 16 loads of
    # that width the SASS keeps in flight, one.
    mix = _mix(in_flight_by_width=((16, 16.0), (2, 1.0)))
    assert latency_rounds(_work(phases=((1, 65536),)), mix) == 128
    assert latency_rounds(_work(phases=((1, 65536, 16),)), mix) == 1
    # A width the SASS does not have falls back to the kernel's mean in flight.
    assert latency_rounds(_work(phases=((1, 65536, 8),)), mix) == 32


def test_async_steps_cost_the_pipeline_fill_only_where_the_sass_has_async_copies():
    work = _work(phases=(), async_steps=16, async_bytes_per_step=256 * 64, stages=3)
    assert latency_rounds(work, _mix(async_copies=12)) == 2
    assert latency_rounds(work, _mix(async_copies=0)) == 16 * 32  # synchronous after all
    assert latency_rounds(dataclasses.replace(work, stages=1), _mix(async_copies=12)) == 16 * 32


def test_a_latency_bound_launch_takes_waves_times_rounds_times_the_latency():
    compiled = Compiled(registers=128, shared_bytes=41 * 1024, local_bytes=0, mix=_mix())
    e = estimate(GPU, _work(), compiled)
    assert (e.resident, e.waves, e.bound) == (2, 2, "latency")
    cycles_per_us = GPU.clock_ghz * 1e3
    assert e.us == pytest.approx(2 * 288 * 300 / cycles_per_us + GPU.launch_us)
    assert e.us_low == pytest.approx(2 * 288 * 150 / cycles_per_us + GPU.launch_us)
    assert e.us_high == pytest.approx(2 * 288 * 450 / cycles_per_us + GPU.launch_us)


def test_a_compute_bound_launch_shares_each_sms_math_units_between_its_blocks():
    macs = 64 * 1e6
    work = _work(phases=((1, 0),), macs=macs, grid=2 * 132 * 3)  # 3 waves of 2 blocks per SM
    compiled = Compiled(128, 41 * 1024, 0, _mix(wgmma=10))
    e = estimate(GPU, work, compiled)
    mma = macs / GPU.tensor_macs_per_cycle_per_sm(wgmma=True)
    assert e.bound == "compute" and e.mma_cycles == pytest.approx(mma)
    assert e.us == pytest.approx(3 * 2 * mma / (GPU.clock_ghz * 1e3) + GPU.launch_us)
    # mma.sync at half the wgmma rate; no tensor-core instruction: the FMA rate
    assert estimate(
        GPU, work, dataclasses.replace(compiled, mix=_mix())
    ).mma_cycles == pytest.approx(2 * mma)
    fma = estimate(GPU, work, dataclasses.replace(compiled, mix=_mix(tensor_core=0)))
    assert fma.mma_cycles == pytest.approx(macs / GPU.fp32_macs_per_cycle_per_sm())
    # wgmma and mma.sync in one kernel: the described wgmma share at the wgmma rate
    both = dataclasses.replace(compiled, mix=_mix(tensor_core=10, wgmma=4))
    split = dataclasses.replace(work, wgmma_macs=macs / 4)
    assert estimate(GPU, split, both).mma_cycles == pytest.approx(mma / 4 + 2 * mma * 3 / 4)
    assert estimate(GPU, work, both).mma_cycles == pytest.approx(mma)  # undescribed: wgmma


def test_a_memory_bound_launch_takes_its_bytes_over_the_bandwidth():
    work = _work(phases=((1, 0),), hbm_bytes=335e6)  # 100 µs at 3.35 TB/s
    e = estimate(GPU, work, Compiled(32, 0, 0, _mix()))
    assert e.bound == "memory"
    assert e.us == pytest.approx(100 + GPU.launch_us)


def test_a_block_that_does_not_fit_is_an_error_naming_the_kernel():
    with pytest.raises(ValueError, match="big: one block"):
        estimate(GPU, _work(name="big"), Compiled(32, 300 * 1024, 0, _mix()))


def test_rows_sum_to_the_backend_total_and_names_are_unique():
    launch = {
        "name": "_head_kernel",
        "grid": [288, 1, 1],
        "programs": 288,
        "threads": 256,
        "registers": 128,
        "shared_bytes": 41 * 1024,
        "local_bytes": 0,
        "mix": _mix().as_dict(),
        "work": {"phases": [[9, 256 * 64]], "macs": 0.0, "flops": 0.0, "hbm_bytes": 0.0},
    }
    floors = model.op_floors(GPU, 16, 862, 512, 3, 2)
    entry = model.backend_estimate(GPU, [launch, launch], floors)
    assert list(entry["kernels"]) == ["head", "head#2"]
    assert entry["total_us"] == pytest.approx(2 * entry["kernels"]["head"]["us"], abs=0.1)


def test_op_floors_match_the_design_cost_at_the_traffic_shape():
    floors = model.op_floors(GPU, 16, 862, 512, 3, 2)
    # docs/design.md §4: 471 M MAC per batch element, 15.1 GFLOP at B=16
    assert floors["useful_flops"] == pytest.approx(15.1e9, rel=0.01)
    assert floors["compute_floor_us"] == pytest.approx(15.07e9 / 790e6, rel=0.01)
    # x read and y written in bf16 dominate the HBM floor: 2 * 16 * 862 * 512 * 2 bytes
    assert floors["hbm_floor_us"] > 2 * 16 * 862 * 512 * 2 / 3.35e6


def test_parity_taps_of_the_transposed_conv():
    assert [_taps(3, r) for r in (0, 1)] == [1, 2]
    assert [_taps(1, r) for r in (0, 1)] == [1, 0]
    assert [_taps(7, r) for r in (0, 1)] == [3, 4]
    assert all(_taps(k, 0) + _taps(k, 1) == k for k in (1, 3, 5, 7, 9))


# --- the launch capture -----------------------------------------------------------------


def test_the_triton_launchers_are_captured_with_their_plan_on_meta_tensors():
    pytest.importorskip("triton")
    from bench.cost_model import triton_compile as tc
    from casa_kernels.ops.triton_kernels import launch as tk

    B, N, D, k = 2, 37, 64, 3
    real = tk._launch
    launches = tc.op_launches(B, N, D, k, torch.bfloat16, sm_count=132)
    assert tk._launch is real  # restored after the capture
    assert [launch.name for launch in launches] == [
        "_head_kernel",
        "_h1_kernel",
        *["_bottleneck_layer_kernel"] * 4,
        "_tail_stats_kernel",
        "_stats_merge_kernel",
        "_tail_output_kernel",
    ]
    head = launches[0]
    config = tc.configs(head)[0]
    grid = tc.grid(head, config)
    out = head.args[2]  # the partials [S, B, C1, D/2]
    splits = tk.head_split_count(B, N, D, tk.program_target(132))
    assert out.device.type == "meta" and out.shape[0] == grid[2] <= splits
    # The head's tile is the plan's under every config, so is the split count it ran for.
    assert all(not c.kwargs for c in tc.configs(head, all_configs=True))
    assert grid[0] == B * math.ceil(D // 4 / tk.HEAD_TILE["BLOCK_C"])
    assert grid[1] == math.ceil(D // 2 / tk.HEAD_TILE["BLOCK_T"])
    # Each bottleneck layer tiled over (positions, output channels, batch) by the plan.
    block_l, block_o = tk.bottleneck_tile(B, D, 132)
    for layer, (_, cout, lin, transposed) in zip(launches[2:6], tk.bottleneck_layers(D)):
        lout = 2 * lin if transposed else lin // 2
        want = (math.ceil(lout / block_l), math.ceil(cout / block_o), B)
        assert tc.grid(layer, tc.configs(layer)[0]) == want
