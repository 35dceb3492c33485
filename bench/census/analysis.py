"""Per-pass, per-element counts of one compiled kernel function.

Each SASS loop's heaviest path (sass.Loop.path_instructions) is weighted by how many times it
runs per element: the product, over the source loops that run it (source.match_loops), of a
factor the kernel family gives for each loop header (1/8 for a loop whose iteration covers 8
time steps, T for a loop over the time steps inside a class loop, ...). Straight-line code
(prologue, per-row reductions, epilogue) is per thread or per row, not per element, and is left
out.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

from . import source
from .sass import Function, Instruction, loads_in_flight
from .sass import weights as sass_weights

@dataclass
class PassCount:
    name: str
    loops: int = 0  # SASS loops attributed to the pass
    instructions: float = 0.0  # thread instructions per element
    mufu: float = 0.0
    global_bytes: float = 0.0  # bytes of global/generic loads and stores per element
    # Iterations per element that wait for their loads (sass.loads_in_flight: a loop's loads of
    # one iteration are in flight together): global_bytes / round_trips is what one thread moves
    # per memory latency.
    round_trips: float = 0.0
    # per element, from the loops' steady state (sass.load_waits): bytes loaded, and the waits on
    # loads in flight; their ratio is the bytes one thread has in flight per memory latency
    loaded_bytes: float = 0.0
    load_waits: float = 0.0


@dataclass
class FunctionCount:
    passes: list[PassCount] = field(default_factory=list)
    unmatched_loops: int = 0  # SASS loops no source loop or no pass claims (left out)

    @property
    def instructions(self) -> float:
        return sum(p.instructions for p in self.passes)

    @property
    def mufu(self) -> float:
        return sum(p.mufu for p in self.passes)


def bytes_per_round_trip(passes: list[PassCount]) -> float:
    """What one thread of `passes` moves per memory latency: their global bytes over their
    round trips (PassCount.round_trips, from sass.loads_in_flight); 0 where none of them waits
    on a load in a loop."""
    streaming = [p for p in passes if p.round_trips]
    if not streaming:
        return 0.0
    return sum(p.global_bytes for p in streaming) / sum(p.round_trips for p in streaming)


def relocate(function: Function, path: str) -> None:
    """Point line info at `path` where it names a file of the same name elsewhere (Triton's
    cubins name the temporary package view they were compiled from)."""
    name = os.path.basename(path)
    for ins in function.instructions:
        ins.source = tuple(
            type(frame)(path, frame.line) if os.path.basename(frame.file) == name else frame
            for frame in ins.source)


def count(function: Function, path: str, anchors: list[tuple[str | None, str]],
          factor: Callable[[source.SourceLoop], float],
          per_row: Callable[[tuple[source.SourceLoop, ...]], float] | None = None,
          skip: tuple[str, ...] = ()) -> FunctionCount:
    """Per-element counts of `function` by pass (straight-line code too, where `per_row` is
    given: every instruction of it, both arms of its branches, an upper bound). `path`: the kernel's source file (pass anchors
    and loop headers are looked up there and in the files its line info names); `factor(loop)`:
    runs of one iteration of that source loop per element (1 for loops that do not multiply
    their body); `per_row(chain)`: a further weight for the whole chain, e.g. threads / C for a
    loop outside every loop over the elements (per-row work, spread over the row); `skip`:
    passes this call does not run (a runtime branch around them). Only loops in files under the
    kernel's own folder's parent (the project's sources) count as source loops."""
    root = os.path.dirname(os.path.dirname(path))
    files = {frame.file for ins in function.instructions for frame in ins.source
             if os.path.abspath(frame.file).startswith(root + os.sep)}
    loops = [sl for f in sorted(files) if os.path.exists(f) for sl in source.source_loops(f)]
    chains = source.match_loops(function, loops)
    anchor_at = source.anchor_lines(path, anchors)
    names = [name for name, _ in anchors if name is not None]
    result = FunctionCount([PassCount(name) for name in dict.fromkeys(names)])
    by_name = {p.name: p for p in result.passes}
    # Several SASS loops running the same source loops in one pass are versions of one loop the
    # compiler specialised on a runtime condition (row in shared memory or not, ...): one runs,
    # so the costliest counts, not their sum.
    versions: dict[tuple, tuple[float, float, float, float]] = {}
    for loop in function.loops():
        if loop.start not in chains:
            continue  # padding
        chain = chains[loop.start]
        name = source.loop_pass(loop, path, anchor_at)
        if not chain or name is None:
            result.unmatched_loops += 1
            continue
        if name in skip:
            continue
        weight = 1.0
        for source_loop in chain:
            weight *= factor(source_loop)
        if per_row is not None:
            weight *= per_row(chain)
        cost = (loop.path_instructions * weight, loop.path_mufu * weight,
                loop.path_global_bytes * weight, weight if loads_in_flight(loop) else 0.0,
                loop.loaded_bytes * weight, loop.load_waits * weight)
        key = (name, chain)
        versions[key] = max(versions.get(key, cost), cost)
        by_name[name].loops += 1
    # Straight-line code runs once per thread and row: spread over the row like per-row loops
    # (a Triton kernel that holds the row on chip does most of its work there).
    if per_row is not None:
        ranges = [(lp.start, lp.end) for lp in function.loops()]
        spread = per_row(())
        for ins in function.instructions:
            if any(start <= ins.address <= end for start, end in ranges):
                continue
            name = source.pass_of(ins, path, anchor_at)
            if name is None or name in skip:
                continue
            key = (name, ("straight-line", ins.address))
            # (no loads in flight counted: per-row code, not the streaming loops)
            versions[key] = (*(w * spread for w in sass_weights(ins)), 0.0, 0.0, 0.0)
    for (name, _), (instructions, mufu, global_bytes, round_trips, loaded, waits) in (
            versions.items()):
        target = by_name[name]
        target.instructions += instructions
        target.mufu += mufu
        target.global_bytes += global_bytes
        target.round_trips += round_trips
        target.loaded_bytes += loaded
        target.load_waits += waits
    return result


def header_matches(loop: source.SourceLoop, pattern: str) -> bool:
    return re.search(pattern, loop.header) is not None
