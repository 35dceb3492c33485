"""SASS of a cubin: the disassembler's text parsed into functions, instructions, loops.

nvdisasm with `-gi -c` prints, before each instruction whose source position changes, the source
line and the chain of lines it was inlined at (the kernel is compiled with -lineinfo, which
changes no generated instruction). A loop is the address range from a backward branch's target
to the branch; an instruction's pass is decided by the source lines of that chain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable


def tool(name: str) -> str:
    """Path of a CUDA binary utility (cuobjdump, nvdisasm): the copy the nvidia-cuda-* PyPI
    package installs (requirements-dev.txt), else Triton's bundled one, else one on PATH."""
    candidates = []
    try:
        import nvidia  # namespace package of the nvidia-cuda-* wheels
        for root in nvidia.__path__:
            candidates += [os.path.join(root, sub, "bin", name) for sub in ("cu13", "cu12", "")]
    except ImportError:
        pass
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", name))
    except ImportError:
        pass
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install requirements-dev.txt "
                                f"(nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm)")
    return found


@dataclass(frozen=True)
class SourceLine:
    file: str
    line: int


@dataclass
class Instruction:
    address: int
    opcode: str  # mnemonic with modifiers, e.g. "LDG.E.128.CONSTANT"
    text: str  # the whole instruction, predicate and operands included
    # innermost first: the line itself, then each line it was inlined at
    source: tuple[SourceLine, ...] = ()

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> str | None:
        match = re.search(r"`\((\.L_x_\d+)\)", self.text)
        return match.group(1) if match and self.base in ("BRA", "BRX", "JMP") else None


@dataclass
class Loop:
    start: int  # address of the first instruction (the backward branch's target)
    end: int  # address of the backward branch
    instructions: list[Instruction] = field(default_factory=list)  # own: nested loops excluded
    depth: int = 0  # 0 for an outermost loop
    # The longest path through one iteration (loop head to the backward branch) over the loop's
    # own instructions: one arm of every branch, the heavier; no early exit; a nested loop
    # counts nothing here (it has its own count and trip count); a call counts one instruction.
    # For option branches the compiler unswitched into copies of the body this is the costliest
    # option set's body, where a static count would add up every copy.
    path_instructions: int = 0
    path_mufu: int = 0
    path_global_bytes: int = 0  # bytes one thread loads and stores from global memory on it
    # Global loads of one iteration in steady state (load_waits): bytes one thread loads, and the
    # times it stalls on a load still in flight. Their ratio is the bytes it has in flight per
    # memory latency.
    loaded_bytes: int = 0
    load_waits: int = 0

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self is not other


@dataclass
class Function:
    name: str
    instructions: list[Instruction]
    labels: dict[str, int]  # label -> address
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    _loops: list[Loop] | None = field(default=None, repr=False, compare=False)

    def loops(self) -> list[Loop]:
        """Every loop (backward branch), each with the instructions it holds and no nested loop
        holds, outermost first by address. Two backward branches to one target are one loop.
        Computed once (the function is not changed after parsing)."""
        if self._loops is None:
            self._loops = self._find_loops()
        return self._loops

    def leave_out(self, rare: Callable[[Instruction], bool]) -> None:
        """Recount every loop's heaviest path with the instructions `rare` picks weighing
        nothing: the arm of a branch that data of any use never takes (a fallback for
        subnormal or infinite operands), which would otherwise be the heavier arm."""
        for loop in self.loops():
            nested = [inner for inner in self.loops() if loop.contains(inner)]
            loop.path_instructions, loop.path_mufu, loop.path_global_bytes = _longest_path(
                loop, nested, self.labels, rare)

    def leave_out_loads(self, absent: Callable[[Instruction], bool]) -> None:
        """Recount every loop's loads in flight (load_waits) with the loads `absent` picks not
        issued."""
        for loop in self.loops():
            loop.loaded_bytes, loop.load_waits = load_waits(loop.instructions, absent)

    def _find_loops(self) -> list[Loop]:
        ranges: dict[int, int] = {}
        for ins in self.instructions:
            target = ins.branch_target
            if target is not None and self.labels.get(target, ins.address + 1) <= ins.address:
                start = self.labels[target]
                ranges[start] = max(ranges.get(start, start), ins.address)
        loops = [Loop(start, end) for start, end in sorted(ranges.items())]
        for loop in loops:
            loop.depth = sum(other.contains(loop) for other in loops)
        for ins in self.instructions:
            holders = [loop for loop in loops if loop.start <= ins.address <= loop.end]
            if holders:
                max(holders, key=lambda loop: loop.depth).instructions.append(ins)
        for loop in loops:
            nested = [inner for inner in loops if loop.contains(inner)]
            loop.path_instructions, loop.path_mufu, loop.path_global_bytes = _longest_path(
                loop, nested, self.labels)
            loop.loaded_bytes, loop.load_waits = load_waits(loop.instructions)
        return loops


def _unconditional(ins: Instruction) -> bool:
    return not ins.text.startswith("@") or ins.text.startswith("@PT ")


_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def access_bytes(ins: Instruction) -> int:
    """Bytes one thread moves with a global or generic load or store, 0 for anything else."""
    if ins.base not in ("LDG", "LD", "STG", "ST"):
        return 0
    modifiers = ins.opcode.split(".")[1:]
    return next((_WIDTHS[m] for m in modifiers if m in _WIDTHS), 4)


_REGISTER = re.compile(r"\bR(\d+)(\.64)?\b")


def _registers(operand_text: str) -> set[int]:
    """Register numbers an operand list names (a 64-bit pair `R12.64` names R12 and R13)."""
    named = set()
    for number, pair in _REGISTER.findall(operand_text):
        named.update(range(int(number), int(number) + (2 if pair else 1)))
    return named


def loads_in_flight(loop: Loop) -> int:
    """Bytes of global (or generic) loads one thread of `loop` has issued in an iteration before
    it first reads a register one of them writes: what it has in flight when it starts to wait
    (Little's law's bytes per thread). Walks the loop's own instructions in address order."""
    pending: set[int] = set()
    issued = 0
    for ins in sorted(loop.instructions, key=lambda i: i.address):
        operands = re.sub(r"^(@!?U?P[T0-9]+\s+)?\S+\s*", "", ins.text)  # predicate, opcode
        if ins.base in ("LDG", "LD"):
            destination, _, sources = operands.partition(",")
            if pending & _registers(sources):
                break
            first = _registers(destination)
            size = access_bytes(ins)
            pending.update(range(min(first), min(first) + max(1, size // 4)) if first else ())
            issued += size
        elif pending & _registers(operands):
            break
    return issued


_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


def _operands(ins: Instruction) -> list[str]:
    body = _PREDICATE.sub("", ins.text).split(None, 1)
    return [part.strip() for part in body[1].split(",")] if len(body) > 1 else []


def _is_load(ins: Instruction) -> bool:
    return ins.base in ("LDG", "LD")


def _spanned(operand: str, count: int) -> set[int]:
    """The `count` registers from the first one `operand` names (a load's destination, a store's
    data), none if it names none (RZ)."""
    named = _registers(operand)
    return set(range(min(named), min(named) + count)) if named else set()


def _touched(ins: Instruction) -> set[int]:
    """The general registers one instruction reads or writes; the data operand of a global access
    of 8 or 16 bytes (the first operand of a load, the last of a store) names two or four."""
    operands = _operands(ins)
    found = set().union(*(_registers(op) for op in operands))
    size = access_bytes(ins)
    if size > 4 and operands:
        found |= _spanned(operands[0] if _is_load(ins) else operands[-1], size // 4)
    return found


def load_waits(instructions: list[Instruction],
               absent: Callable[[Instruction], bool] | None = None) -> tuple[int, int]:
    """(bytes of global loads, waits on them) of one thread over one iteration of a loop body in
    steady state; loads `absent` picks are not issued (an optional input the modelled call does
    not pass). Where loads_in_flight sizes the first wait of an iteration, this counts every wait
    in it: a fully unrolled body (the LIF backward's segment) waits many times per iteration.

    Program order, address by address (every arm of a branch in turn; a branch does not wait:
    the scoreboard of a load outlives it). A load's destination registers are pending until an
    instruction reads or overwrites one of them: that instruction waits, and the loads issued
    before it are taken to arrive with the awaited one (loads issued back to back return
    together), so every pending load is cleared. A thread then moves (bytes loaded / waits) per
    memory latency: a 16-byte load used right after it is issued gives 16, a segment's 32 such
    loads issued before the first use 512. The body is walked twice and the second walk counted,
    so that loads issued for the next iteration (software pipelining across the back edge) are
    waited for where they are used."""
    pending: set[int] = set()
    counted = (0, 0)
    for _ in range(2):
        loaded = waits = 0
        for ins in instructions:
            if absent is not None and absent(ins):
                continue
            if pending & _touched(ins):
                waits += 1
                pending.clear()
            if _is_load(ins):
                size = access_bytes(ins)
                loaded += size
                pending |= _spanned(_operands(ins)[0], max(size // 4, 1))
        counted = (loaded, waits)
    return counted


def weights(ins: Instruction, vector_loop: bool = False) -> tuple[int, int, int]:
    """(1, MUFU or not, global bytes) of one instruction. In a loop that moves 16-byte vectors
    (`vector_loop`), a predicated narrower access is the row's unaligned edge, which the
    compiler predicates on the same path as the vector access it replaces: its bytes are not
    counted a second time."""
    size = access_bytes(ins)
    if vector_loop and size < 16 and ins.text.startswith("@") and not _unconditional(ins):
        size = 0
    return 1, int(ins.base == "MUFU"), size


def _longest_path(loop: Loop, nested: list[Loop], labels: dict[str, int],
                  rare: Callable[[Instruction], bool] | None = None) -> tuple[int, int, int]:
    """(instructions, MUFU instructions, global bytes) on the heaviest path (by instructions)
    from loop.start to its backward branch at loop.end, walking forward edges only (the body
    without its back edge is acyclic); instructions `rare` picks weigh nothing."""
    inner = [lp for lp in nested if not any(o.contains(lp) for o in nested)]
    vector = any(access_bytes(ins) == 16 for ins in loop.instructions)

    def weigh(ins: Instruction) -> tuple[int, int, int]:
        return (0, 0, 0) if rare is not None and rare(ins) else weights(ins, vector)
    # Nodes by address: own instructions, and each directly nested loop as one node that costs
    # nothing and continues after its backward branch.
    nodes: dict[int, tuple[Instruction | None, list[int]]] = {}
    addresses = sorted([ins.address for ins in loop.instructions] + [lp.start for lp in inner])
    following = {a: b for a, b in zip(addresses, addresses[1:])}
    for lp in inner:
        after = min((a for a in addresses if a > lp.end), default=None)
        nodes[lp.start] = (None, [after] if after is not None else [])
    for ins in loop.instructions:
        successors = []
        if ins.address == loop.end:
            nodes[ins.address] = (ins, [])
            continue
        target = ins.branch_target
        falls_through = not (target is not None and _unconditional(ins)) and not (
            ins.base in ("EXIT", "RET") and _unconditional(ins))
        if falls_through and ins.address in following:
            successors.append(following[ins.address])
        if target is not None and labels.get(target, -1) > ins.address:
            successors.append(labels[target])
        nodes[ins.address] = (ins, successors)
    best: dict[int, tuple[int, int, int] | None] = {}
    for address in sorted(nodes, reverse=True):
        ins, successors = nodes[address]
        if address == loop.end:
            best[address] = weigh(ins)
            continue
        reachable = [best[s] for s in successors if best.get(s) is not None]
        if not reachable:
            best[address] = None  # every path from here leaves the loop
            continue
        heaviest = max(reachable)
        if ins is not None:
            heaviest = tuple(a + b for a, b in zip(heaviest, weigh(ins)))
        best[address] = heaviest
    found = best.get(loop.start)
    if found is None:  # no forward path closes the iteration (irreducible flow): count it all
        return tuple(sum(w) for w in zip(*(weigh(ins) for ins in loop.instructions)))
    return found


_FUNCTION = re.compile(r"^\s*\.text\.(\S+):\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):\s*$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(.*)$')
_INLINED = re.compile(r'inlined at "([^"]+)", line (\d+)')


def parse(text: str) -> dict[str, Function]:
    """nvdisasm -gi -c output -> {mangled name: Function}."""
    functions: dict[str, Function] = {}
    current: Function | None = None
    pending_labels: list[str] = []
    source: tuple[SourceLine, ...] = ()
    fresh_block = True  # a run of //## comments starts a new source position
    for raw in text.splitlines():
        match = _FUNCTION.match(raw)
        if match:
            current = Function(match.group(1), [], {})
            functions[current.name] = current
            source, fresh_block = (), True
            continue
        if current is None:
            continue
        match = _LINE.search(raw)
        if match:
            # nvdisasm prints the full chain first, then the outer frames again on their own;
            # the first comment of a run is the complete chain.
            # Paths normalised: a header included as "../x.h" is named "csrc/cuda/../x.h".
            if fresh_block:
                chain = [SourceLine(os.path.normpath(match.group(1)), int(match.group(2)))]
                chain += [SourceLine(os.path.normpath(f), int(n))
                          for f, n in _INLINED.findall(match.group(3))]
                source = tuple(chain)
            fresh_block = False
            continue
        match = _LABEL.match(raw.strip())
        if match:
            pending_labels.append(match.group(1))
            continue
        match = _INSTRUCTION.match(raw)
        if match:
            fresh_block = True
            address = int(match.group(1), 16)
            body = re.sub(r"^@!?U?P[T0-9]+\s+", "", match.group(2))
            opcode = body.split()[0] if body else ""
            current.instructions.append(Instruction(address, opcode, match.group(2), source))
            for label in pending_labels:
                current.labels[label] = address
            pending_labels = []
    return functions


def resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage output -> {mangled name: {"REG": .., "SHARED": .., "STACK": ..}}."""
    usage: dict[str, dict[str, int]] = {}
    name = None
    for raw in text.splitlines():
        match = re.match(r"\s*Function (\S+):", raw)
        if match:
            name = match.group(1)
            continue
        if name is not None and "REG:" in raw:
            usage[name] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", raw)}
            name = None
    return usage


def disassemble(cubin_path: str) -> dict[str, Function]:
    """The cubin's functions with their SASS, registers and static shared memory."""
    text = subprocess.run([tool("nvdisasm"), "-gi", "-c", cubin_path], capture_output=True,
                          text=True, check=True).stdout
    functions = parse(text)
    report = subprocess.run([tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True,
                            text=True, check=True).stdout
    for name, usage in resource_usage(report).items():
        if name in functions:
            functions[name].registers = usage.get("REG", 0)
            functions[name].shared_bytes = usage.get("SHARED", 0)
            functions[name].stack_bytes = usage.get("STACK", 0)
    return functions
