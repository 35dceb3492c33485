"""Source side of the census: the loops of a kernel's source (C++ or Triton Python), which of
them each SASS loop runs, and the pass each SASS loop belongs to.

A SASS loop is matched to the deepest source loop that encloses most of its instructions, an
instruction being enclosed when any line of its inlining chain lies in the loop. Unrolled source
loops have no SASS loop and are not matched; they are part of their enclosing loop's body. A pass
is named by anchors: (name, pattern) pairs whose first match in the kernel's source file starts
the pass; an instruction belongs to the last anchor at or above the outermost line of its chain
in that file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .sass import Function, Instruction, Loop


@dataclass(frozen=True)
class SourceLoop:
    file: str
    header_line: int
    end_line: int
    header: str  # the header's text, e.g. "for (int64_t t = 0; t < steps; ++t)"

    def encloses(self, file: str, line: int) -> bool:
        return file == self.file and self.header_line <= line <= self.end_line


def cpp_loops(path: str) -> list[SourceLoop]:
    """Every for/while loop of a C++ file, with the line range of its body."""
    text = open(path).read()
    line_of = [0] * (len(text) + 1)
    line = 1
    for i, char in enumerate(text):
        line_of[i] = line
        line += char == "\n"
    line_of[len(text)] = line
    # Comments and strings blanked (same length), so braces inside them do not count.
    code = re.sub(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"",
                  lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    loops = []
    for match in re.finditer(r"\b(for|while)\s*\(", code):
        depth, i = 1, match.end()
        while depth and i < len(code):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        header = " ".join(code[match.start():i].split())
        j = i
        while j < len(code) and code[j].isspace():
            j += 1
        if j < len(code) and code[j] == "{":
            depth, j = 1, j + 1
            while depth and j < len(code):
                depth += {"{": 1, "}": -1}.get(code[j], 0)
                j += 1
        else:
            j = code.find(";", j)
        loops.append(SourceLoop(path, line_of[match.start()], line_of[min(j, len(code))], header))
    return loops


def python_loops(path: str) -> list[SourceLoop]:
    """Every for/while loop of a Python file, its body being the lines indented under it."""
    lines = open(path).read().splitlines()
    loops = []
    for number, text in enumerate(lines, start=1):
        match = re.match(r"(\s*)(for|while)\b(.*):\s*(#.*)?$", text)
        if not match:
            continue
        indent = len(match.group(1))
        end = number
        for later in range(number, len(lines)):
            body = lines[later]
            if body.strip() and len(body) - len(body.lstrip()) <= indent:
                break
            if body.strip():
                end = later + 1
        loops.append(SourceLoop(path, number, end, text.strip().rstrip(":")))
    return loops


def source_loops(path: str) -> list[SourceLoop]:
    return python_loops(path) if path.endswith(".py") else cpp_loops(path)


def _enclosing(ins: Instruction, loops: list[SourceLoop]) -> set[SourceLoop]:
    return {loop for loop in loops for frame in ins.source if loop.encloses(frame.file, frame.line)}


def match_loops(function: Function, loops: list[SourceLoop]) -> dict[int, tuple[SourceLoop, ...]]:
    """{SASS loop start: the source loops that run it, outermost first} for every SASS loop of
    more than one instruction (a one-instruction loop is the branch-to-self padding after EXIT).

    A SASS loop runs the deepest source loop enclosing its backward branch, whose line is that
    loop's control (its header or closing line); the chain also holds every source loop around
    that branch that some SASS loop runs (unrolled loops have none): their trip counts multiply
    the body. The branch, not the body, decides, because Triton's line info keeps no call site
    for the instructions of inlined helpers."""
    sass_loops = [lp for lp in function.loops() if len(lp.instructions) > 1]
    files = {sl.file for sl in loops}
    around: dict[int, list[SourceLoop]] = {}
    matched = set()
    for lp in sass_loops:
        branch = next(ins for ins in lp.instructions if ins.address == lp.end)
        around[lp.start] = sorted(_enclosing(branch, loops),
                                  key=lambda sl: -(sl.end_line - sl.header_line))
        # A loop whose branch lies in a file outside `loops` (a CUDA header's retry loop of an
        # atomic or a warp match) runs none of the source loops around its call.
        if around[lp.start] and branch.source and branch.source[0].file in files:
            matched.add(around[lp.start][-1])
    return {start: tuple(sl for sl in chain if sl in matched) for start, chain in around.items()}


def anchor_lines(path: str, anchors: list[tuple[str | None, str]]) -> list[tuple[int, str | None]]:
    """[(line, pass name)] of each anchor's first match in `path`, by line. An anchor starts a
    region of the file that lasts until the next one; a region named None belongs to no pass
    (helpers several passes share). An anchor that no longer matches raises: the census would
    silently attribute its pass to another."""
    lines = open(path).read().splitlines()
    found = []
    for name, pattern in anchors:
        hit = next((n for n, text in enumerate(lines, start=1) if re.search(pattern, text)), None)
        if hit is None:
            raise ValueError(f"pass anchor {name!r} ({pattern!r}) not found in {path}")
        found.append((hit, name))
    return sorted(found)


def pass_of(ins: Instruction, path: str, anchors: list[tuple[int, str | None]]) -> str | None:
    """The pass of one instruction: the region of the outermost line of its inlining chain in
    `path` that lies in a pass's region. (The chain may stop short of the kernel's body: nvcc's
    line info keeps two or three levels of inlining.)"""
    for frame in reversed(ins.source):
        if frame.file != path:
            continue
        region = None
        for anchor_line, anchor_name in anchors:
            if anchor_line <= frame.line:
                region = anchor_name
        if region is not None:
            return region
    return None


def loop_pass(loop: Loop, path: str, anchors: list[tuple[int, str | None]]) -> str | None:
    """The pass most of a SASS loop's instructions belong to."""
    votes = Counter(pass_of(ins, path, anchors) for ins in loop.instructions)
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None
