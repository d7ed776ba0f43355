"""Reading compiled GPU code: SASS text (``cuobjdump -sass``) and resource usage
(``cuobjdump -res-usage``), as printed by the cuobjdump that Triton ships.

Pure text parsing, no GPU and no tools needed: the functions take the printed text.
What the cost model reads from it (:func:`instruction_mix`):

* the static instruction mix: tensor-core instructions (``HGMMA`` = wgmma, ``HMMA`` =
  mma.sync), CUDA-core floating-point math (``FFMA``, ``FMUL``, ``FADD``, ``HFMA2`` ...),
  synchronous global loads (``LDG``), asynchronous global→shared copies (``LDGSTS`` =
  cp.async, ``UTMALDG`` = TMA), shared loads/stores, barriers;
* the mean width in bytes of the synchronous global loads (``LDG.E.U16`` = 2,
  ``LDG.E`` = 4, ``LDG.E.64`` = 8, ``LDG.E.128`` = 16);
* the loads in flight per thread (:func:`loads_in_flight`): how many synchronous global
  loads a thread issues, on average, before it uses the result of one of them.

The instruction mix's counts are static (instructions in the code, not executions);
:func:`executed_tensor_core_share` weights the math instructions by how often they run
(its docstring and docs/design.md §15 say how, and its limits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

# `/*0a30*/  @!P1 LDG.E.U16 R12, desc[UR4][R2.64] ;`: address, optional predicate,
# opcode with modifiers, operands.
_INSTRUCTION = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);"
)
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$", re.M)
_REGISTER = re.compile(r"\bR(\d+)\b")
_RESOURCES = re.compile(r"Function (\S+?):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")

TENSOR_CORE = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA")
FP_MATH = ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "DFMA", "DMUL", "DADD")
ASYNC_COPY = ("LDGSTS", "UTMALDG", "UBLKCP")
# Synchronous global (and generic) loads: the thread's registers wait for them.
SYNC_LOAD = ("LDG", "LD")
_LOAD_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass(frozen=True)
class Instruction:
    opcode: str  # e.g. "LDG"
    modifiers: tuple[str, ...]  # e.g. ("E", "U16", "CONSTANT")
    operands: str  # the text after the opcode, without the ";"


@dataclass(frozen=True)
class Resources:
    """Per-thread registers, stack and local (spilled) bytes and static shared bytes."""

    registers: int
    stack: int
    shared: int
    local: int


@dataclass(frozen=True)
class InstructionMix:
    total: int
    tensor_core: int
    wgmma: int  # of which HGMMA (warpgroup MMA, sm_90a)
    fp_math: int
    sync_loads: int
    async_copies: int
    shared_loads: int
    shared_stores: int
    barriers: int
    sync_load_bytes: float  # mean width of a synchronous global load, bytes
    loads_in_flight: float  # see loads_in_flight()
    # ((width in bytes, loads in flight when one of that width is issued), ...): see
    # loads_in_flight(); for a phase whose description names its loads' width
    in_flight_by_width: tuple[tuple[int, float], ...] = ()

    def in_flight_of(self, width: int) -> float:
        """Loads in flight when a load of ``width`` bytes is issued (the kernel's mean
        when the SASS has none of that width)."""
        return dict(self.in_flight_by_width).get(width, self.loads_in_flight)

    @property
    def tensor_core_share(self) -> float:
        """Tensor-core instructions over all math instructions (tensor core + FP math)."""
        math = self.tensor_core + self.fp_math
        return self.tensor_core / math if math else 0.0

    @property
    def tensor_core_of_all(self) -> float:
        """Tensor-core instructions over all instructions."""
        return self.tensor_core / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        """The counts, with the shares rounded, JSON-ready (:meth:`from_dict` reads it)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sync_load_bytes"] = round(self.sync_load_bytes, 2)
        out["loads_in_flight"] = round(self.loads_in_flight, 2)
        out["in_flight_by_width"] = {str(w): round(n, 2) for w, n in self.in_flight_by_width}
        out["tensor_core_share"] = round(self.tensor_core_share, 3)
        out["tensor_core_of_all"] = round(self.tensor_core_of_all, 4)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> InstructionMix:
        values = {f.name: data[f.name] for f in fields(cls) if f.name != "in_flight_by_width"}
        by_width = data.get("in_flight_by_width", {})
        return cls(**values, in_flight_by_width=tuple((int(w), n) for w, n in by_width.items()))


def split_functions(sass: str) -> dict[str, str]:
    """``{function name: its SASS text}`` for every ``Function :`` section."""
    marks = list(_FUNCTION.finditer(sass))
    return {
        m.group(1): sass[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(sass)]
        for i, m in enumerate(marks)
    }


def addressed_instructions(sass: str) -> list[tuple[int, Instruction]]:
    """``(address, instruction)`` of one function's SASS text, in text order."""
    return [
        (
            int(m.group(1), 16),
            Instruction(m.group(2), tuple(filter(None, m.group(3).split("."))), m.group(4).strip()),
        )
        for m in _INSTRUCTION.finditer(sass)
    ]


def instructions(sass: str) -> list[Instruction]:
    """The instructions of one function's SASS text, in address order."""
    return [ins for _, ins in addressed_instructions(sass)]


def parse_resources(text: str) -> dict[str, Resources]:
    """``{function name: Resources}`` from ``cuobjdump -res-usage`` output."""
    return {
        m.group(1): Resources(*(int(v) for v in m.group(2, 3, 4, 5)))
        for m in _RESOURCES.finditer(text)
    }


def _destination_registers(ins: Instruction) -> set[int]:
    """Registers a load writes: its first operand, widened by the load's vector size."""
    first = _REGISTER.search(ins.operands.split(",")[0])
    if first is None:
        return set()
    words = max(1, load_bytes(ins) // 4)
    return set(range(int(first.group(1)), int(first.group(1)) + words))


def _source_registers(ins: Instruction) -> set[int]:
    """Registers an instruction reads. Stores and branches read every operand; others
    read all operands but the first (their destination)."""
    parts = ins.operands.split(",")
    reads_all = ins.opcode.startswith(("ST", "RED", "ATOM", "BRA", "RET")) or ins.opcode in (
        "STS",
        "STG",
    )
    text = ",".join(parts if reads_all else parts[1:])
    return {int(r) for r in _REGISTER.findall(text)}


def load_bytes(ins: Instruction) -> int:
    """Bytes one thread moves with the load ``ins`` (4 without a size modifier)."""
    for mod in ins.modifiers:
        if mod in _LOAD_BYTES:
            return _LOAD_BYTES[mod]
    return 4


def load_groups(code: list[Instruction]) -> list[list[int]]:
    """The synchronous global loads in groups that overlap in memory, each group the
    widths (bytes) of its loads. Walks the code in order; loads issued before the first
    instruction that reads the register of an earlier, unconsumed load form one group (a
    group costs one memory latency)."""
    groups, group, pending = [], [], set()
    for ins in code:
        if pending and _source_registers(ins) & pending:
            groups.append(group)
            group, pending = [], set()
        if ins.opcode in SYNC_LOAD:
            group.append(load_bytes(ins))
            pending |= _destination_registers(ins)
    if group:
        groups.append(group)
    return groups


def loads_in_flight(code: list[Instruction]) -> float:
    """Synchronous global loads a thread has in flight, on average, when it issues one:
    loads / groups (:func:`load_groups`). 1 where each load is used before the next is
    issued (a per-element gather into shared memory), 16 where 16 loads go out back to
    back. 1 when there are no such loads.
    """
    groups = load_groups(code)
    return sum(map(len, groups)) / len(groups) if groups else 1.0


def in_flight_by_width(code: list[Instruction]) -> tuple[tuple[int, float], ...]:
    """Per load width (bytes), the mean size of the groups its loads go out in
    (:func:`load_groups`), widest first: how many loads a phase of that width has in
    flight where one kernel mixes, say, 16-byte loads issued back to back with 2-byte
    loads used one at a time."""
    sizes: dict[int, list[int]] = {}
    for group in load_groups(code):
        for width in set(group):
            sizes.setdefault(width, []).append(len(group))
    return tuple((w, sum(n) / len(n)) for w, n in sorted(sizes.items(), reverse=True))


def instruction_mix(sass: str) -> InstructionMix:
    """The static instruction mix of one function's SASS text."""
    code = instructions(sass)
    ops = [ins.opcode for ins in code]
    loads = [ins for ins in code if ins.opcode in SYNC_LOAD]
    return InstructionMix(
        total=len(code),
        tensor_core=sum(op in TENSOR_CORE for op in ops),
        wgmma=sum(op == "HGMMA" for op in ops),
        fp_math=sum(op in FP_MATH for op in ops),
        sync_loads=len(loads),
        async_copies=sum(op in ASYNC_COPY for op in ops),
        shared_loads=sum(op in ("LDS", "LDSM") for op in ops),
        shared_stores=sum(op == "STS" for op in ops),
        barriers=sum(op == "BAR" for op in ops),
        sync_load_bytes=sum(map(load_bytes, loads)) / len(loads) if loads else 0.0,
        loads_in_flight=loads_in_flight(code),
        in_flight_by_width=in_flight_by_width(code),
    )


@dataclass(frozen=True)
class Loop:
    """A loop of the SASS: a backward branch at ``end`` to ``start`` (addresses)."""

    start: int
    end: int

    def holds(self, address: int) -> bool:
        return self.start <= address <= self.end


def loops(code: list[tuple[int, Instruction]]) -> list[Loop]:
    """Every loop of addressed code: each branch to an address at or before its own."""
    found = []
    for address, ins in code:
        target = _BRANCH_TARGET.search(ins.operands) if ins.opcode == "BRA" else None
        if target and int(target.group(1), 16) <= address:
            found.append(Loop(int(target.group(1), 16), address))
    return found


def _mma_macs(ins: Instruction) -> int:
    """Multiply-adds one warp issues with a tensor-core instruction, from its shape
    modifier: ``HMMA.16816`` = m16 n8 k16; ``HGMMA.64x32x16`` = 64 · 32 · 16 / 4 (a
    warpgroup's instruction, which each of its four warps issues). 0 where the shape is
    not read."""
    for mod in ins.modifiers:
        shape = re.fullmatch(r"(16|8)(8)(4|8|16|32)", mod) or re.fullmatch(
            r"(\d+)x(\d+)x(\d+)", mod
        )
        if shape:
            m, n, k = map(int, shape.groups())
            return m * n * k // (4 if ins.opcode == "HGMMA" else 1)
    return 0


def executed_tensor_core_share(
    sass: str,
    macs: float,
    warps: int,
    mma_loop_trips: float,
    loop_trips: float,
    wgmma_macs: float = 0.0,
) -> float:
    """Tensor-core instructions among the math instructions one warp EXECUTES.

    Tensor-core instructions executed per warp: ``macs`` (one program's multiply-adds,
    from the launch plan) / ``warps`` / the multiply-adds one warp issues with one
    instruction (its shape modifier), exact for a kernel whose MMAs are all of one
    shape per kind; in a kernel with both wgmma (HGMMA) and mma.sync, ``wgmma_macs`` of
    ``macs`` are counted at the HGMMA's shape and the rest at the HMMA's (a kernel with
    HGMMA only: all of them). FP math executed:
    each FP instruction counted once per pass of the code around it, times the trip
    count of every loop it is in: ``mma_loop_trips`` for a loop holding a tensor-core
    instruction (a GEMM's K steps), ``loop_trips`` for any other loop (a copy or
    element-wise epilogue loop over the tile). Loops are found from backward branches
    (:func:`loops`). An approximation: one trip count for all loops of a kind, whatever
    the compiler unrolled, and loops that only some warps run counted for every warp
    (docs/design.md §15). 0 without tensor-core instructions.
    """
    code = addressed_instructions(sass)
    mma = [ins for _, ins in code if ins.opcode in TENSOR_CORE]
    if not mma:
        return 0.0
    warpgroup = max((_mma_macs(i) for i in mma if i.opcode == "HGMMA"), default=0)
    per_warp = max((_mma_macs(i) for i in mma if i.opcode != "HGMMA"), default=0)
    if not per_warp:
        wgmma_macs = macs
    elif not warpgroup:
        wgmma_macs = 0.0
    if (wgmma_macs and not warpgroup) or (macs > wgmma_macs and not per_warp):
        return 0.0
    tensor_core = wgmma_macs / warps / warpgroup if wgmma_macs else 0.0
    tensor_core += (macs - wgmma_macs) / warps / per_warp if macs > wgmma_macs else 0.0
    found = loops(code)
    mma_loops = {
        loop for loop in found if any(loop.holds(a) for a, i in code if i.opcode in TENSOR_CORE)
    }
    fp = 0.0
    for address, ins in code:
        if ins.opcode in FP_MATH:
            weight = 1.0
            for loop in found:
                if loop.holds(address):
                    weight *= mma_loop_trips if loop in mma_loops else loop_trips
            fp += weight
    return tensor_core / (tensor_core + fp)
