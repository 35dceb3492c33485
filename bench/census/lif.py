"""Census of the multi-step LIF kernels (CUDA csrc/cuda/lif_cuda_kernels.cuh, Triton
triton_kernels/lif.py).

Both loop over time for a few neurons per thread: the forward reads x and writes the spikes. Two
backward schedules:
  * "segments" (CUDA; Triton walks the same way): lif_backward_segments of csrc/lif_math.h. H of
    up to K steps sits in registers; sweep 1 runs the forward over all but the last segment
    (reading x) and checkpoints V, sweep 2 recomputes each segment's H (reading x again for all
    but the last) and walks it down (reads the spikes' gradient, writes x's gradient). K depends
    on T: the launchers take the shortest of their segments that holds T (CUDA: read from the
    compiled kernels' template arguments; Triton: lif.SEGMENTS, one compiled kernel each).
  * "scratch" (the kernels before the segments, for --calibrate): H[t] recomputed into a float32
    scratch of x's size (sweep 1: reads x), then read back by the walk down (sweep 2). The
    scratch is grad_x itself where x is float32 (H_IN_GRAD_X), a separate buffer otherwise.
"""

from __future__ import annotations

import os
import re

from . import analysis, build, model
from .machines import Card
from .sass import disassemble

STORAGE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SCRATCH_BYTES = 4  # H[t] is kept in float32 (the state dtype) whatever the storage
# The share of L2 the scratch of the resident blocks may take and still be read back from L2:
# the streamed inputs and outputs pass through the rest.
L2_SHARE_FOR_SCRATCH = 0.5


def cuda_constant(text: str, name: str) -> int:
    match = re.search(rf"constexpr int {name} = (\d+);", text)
    if match is None:
        raise ValueError(f"LIF CUDA kernels: `constexpr int {name} = ...;` not found; the census "
                         f"reads the launch configuration from them")
    return int(match.group(1))


# Template arguments of the compiled CUDA kernels: storage type, then (segments schedule) the
# neurons per thread and, for the backward, the segment length. The old kernels (one neuron per
# thread, scratch schedule) carry the storage and state types instead: IffEE.
_CUDA_TYPES = {"float32": "f", "bfloat16": "13__nv_bfloat16"}


def cuda_kernels(source_root: str) -> dict:
    """{(direction, dtype): (function, counts, threads, neurons per thread, steps per loop
    iteration, schedule)} of the CUDA kernels, with the launch constants read from the source. A
    segments schedule adds ("backward-segments", dtype): {segment: entry} of every backward."""
    path, cubins = build.cuda_kernel_cubins(source_root, "lif", _CUDA_TYPES)
    text = open(path).read()
    threads = cuda_constant(text, "kThreads")
    chunk = cuda_constant(text, "kChunk")  # time steps whose loads a thread issues together
    functions = {name: function for cubin in cubins
                 for name, function in disassemble(cubin).items()}
    if any(re.search(r"lif_backward_kernelI\w+Li\d+ELi\d+EE", n) for n in functions):
        return _segment_kernels(source_root, path, functions, threads, chunk)
    # the first template argument of each kernel's mangled name: its storage type
    names = {"float32": "f", "bfloat16": "13__nv_bfloat16"}
    anchors = {"forward": [("forward", r"lif_forward_kernel\(")],
               "backward": [("recompute H", r"// Sweep 1"), ("gradient", r"// Sweep 2")]}

    def factor(loop) -> float:
        # the chunked time loops: one iteration covers `chunk` steps of one neuron
        return 1.0 / chunk if analysis.header_matches(loop, r"kChunk") else 1.0

    kernels = {}
    for direction in ("forward", "backward"):
        for dtype, tag in names.items():
            function = _one_instantiation(functions, f"lif_{direction}_kernelI{tag}")
            counts = analysis.count(function, path, anchors[direction], factor)
            kernels[direction, dtype] = (function, counts, threads, 1, chunk, "scratch")
    return kernels


def _segment_kernels(source_root, path, functions, threads, chunk) -> dict:
    """The segments schedule's kernels: the vector ones (the widest per dtype), the backward at
    its short and long segment. Passes: the forward kernel's loop; the backward's two sweeps, by
    their lines in lif_math.h's lif_backward_segments."""
    math_path = os.path.join(source_root, "csrc", "lif_math.h")
    rare = _rare_division(math_path)
    if rare is not None:
        for function in functions.values():
            function.leave_out(rare)
    absent = _loads_of(path, "grad_v_seq")
    for function in functions.values():
        function.leave_out_loads(absent)
    backward_anchors = [("sweep 1: checkpoints", r"^\s*group\.begin_forward\(\);"),
                        ("sweep 2: segments", r"^\s*group\.begin_backward\(\);"),
                        (None, r"^\s*group\.end_backward\(\);")]
    kernels = {}
    for dtype, tag in _CUDA_TYPES.items():
        found = {}  # (direction, width, segment) -> function
        for name, function in functions.items():
            match = re.search(rf"lif_(forward|backward)_kernelI{tag}Li(\d+)E(?:Li(\d+)E)?E", name)
            if match:
                found[match.group(1), int(match.group(2)), int(match.group(3) or 0)] = function
        width = max(w for _, w, _ in found)
        (_, forward), = [(k, f) for k, f in found.items() if k[:2] == ("forward", width)]
        counts = analysis.count(
            forward, path, [("forward", r"lif_forward_kernel\(")],
            # the forward's time loop: kSteps (kChunk in the vector kernels) steps an iteration
            lambda loop: 1.0 / (chunk * width) if analysis.header_matches(
                loop, r"kSteps|kChunk") else 1.0)
        kernels["forward", dtype] = (forward, counts, threads, width, chunk, "segments")
        by_segment = {}
        for segment in sorted(k[2] for k in found if k[:2] == ("backward", width)):
            function = found["backward", width, segment]
            counts = analysis.count(
                function, math_path, backward_anchors,
                lambda loop, segment=segment: 1.0 / (segment * width) if analysis.header_matches(
                    loop, r"segments") else 1.0)
            by_segment[segment] = (function, counts, threads, width, segment, "segments")
        kernels["backward-segments", dtype] = by_segment
        kernels["backward", dtype] = by_segment[max(by_segment)]  # the passes census.py lists
    return kernels


def _rare_division(math_path: str):
    """Picks the instructions of divide_by_tau_reciprocal's true division (lif_math.h), the arm
    taken only for a tiny nonzero, infinite or NaN dividend: the heaviest path would count it in
    place of the reciprocal form every other dividend takes. The arms' join (BSSY/BSYNC, which
    the line info may give to the division's line) runs on both and stays counted. None for
    kernels without the reciprocal form (older trees)."""
    lines = open(math_path).read().splitlines()
    found = [n for n, text in enumerate(lines, start=1)
             if re.search(r"return a / p\.tau;\s*// rarely taken", text)]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{math_path}: {len(found)} lines `return a / p.tau;  // rarely taken` "
                         f"(divide_by_tau_reciprocal's fallback); the census leaves exactly one out")
    (line,) = found

    def rare(ins) -> bool:
        return (bool(ins.source) and ins.source[0].line == line
                and os.path.basename(ins.source[0].file) == "lif_math.h"
                and ins.base not in ("BSSY", "BSYNC"))
    return rare


def _loads_of(path: str, tensor: str):
    """Picks the loads of the optional input `tensor` (the line `load_acc(<tensor> + ...` of the
    CUDA kernels, anywhere in an instruction's inlining chain): the calls the census models (the
    benchmarks') do not pass it, and its loads, predicated off, put nothing in flight. As good as
    ptxas's line info: it may give such a load the line of the load issued beside it
    (bench/results/census/after-lif-inflight/README.md lists the cases seen)."""
    lines = {n for n, text in enumerate(open(path).read().splitlines(), start=1)
             if re.search(rf"load_acc\(\s*{tensor}\s*\+", text)}
    if not lines:
        raise ValueError(f"{path}: no `load_acc({tensor} + ...)`; the census leaves its loads out "
                         f"of the bytes in flight")
    name = os.path.basename(path)

    def picked(ins) -> bool:
        return ins.base in ("LDG", "LD") and any(
            frame.line in lines and os.path.basename(frame.file) == name for frame in ins.source)
    return picked


def in_flight(weighted_passes) -> float:
    """Bytes one thread has in flight per memory latency over a launch's passes, each weighted by
    the times it runs per element: their loaded bytes over their waits on loads (sass.load_waits,
    from the compiled code)."""
    loaded = sum(weight * p.loaded_bytes for p, weight in weighted_passes)
    waits = sum(weight * p.load_waits for p, weight in weighted_passes)
    if waits <= 0:
        raise ValueError(f"passes {[p.name for p, _ in weighted_passes]}: no wait on a global "
                         f"load found in their loops; the census cannot size the bytes in flight")
    return loaded / waits


def _one_instantiation(functions: dict, prefix: str):
    """The function whose mangled name holds `prefix` (kernel name and storage type); the
    census models one launch configuration per dtype and says so when the source has more."""
    found = [f for name, f in functions.items() if prefix in name]
    if len(found) != 1:
        raise ValueError(f"LIF CUDA kernels: {len(found)} instantiations of {prefix!r} "
                         f"({[f.name for f in found]}); bench/census/lif.py models exactly one "
                         f"per dtype: update it with the launcher")
    return found[0]


def triton_kernels(source_root: str, harness: str | None = None) -> dict:
    path = os.path.join(source_root, "triton_kernels", "lif.py")
    index = build.triton_cubins(source_root, "lif", harness)
    kernels = {}
    for direction in ("forward", "backward"):
        anchors = ({"forward": [("forward", r"def _lif_forward_kernel")],
                    "backward": [("recompute H", r"# Sweep 1"), ("gradient", r"# Sweep 2")]}
                   [direction])
        for dtype in STORAGE_BYTES:
            entry = index.get(f"lif-{direction}-{dtype}")
            if entry is None:
                continue
            threads = entry["num_warps"] * 32
            per_thread = entry["block"] // threads  # neurons of one lane, one step per iteration
            (function,) = disassemble(entry["cubin"]).values()
            analysis.relocate(function, path)
            counts = analysis.count(
                function, path, anchors,
                lambda loop: 1.0 / per_thread if analysis.header_matches(
                    loop, r"in range\(steps\)") else 1.0)
            kernels[direction, dtype] = (function, counts, threads, per_thread, 1, "scratch")
            if direction == "backward":
                by_segment = _triton_segments(index, path, dtype, threads, per_thread)
                if by_segment:
                    kernels["backward-segments", dtype] = by_segment
                    kernels["backward", dtype] = by_segment[max(by_segment)]
    return kernels


def _triton_segments(index, path, dtype, threads, per_thread) -> dict:
    """{segment: kernel entry} of a backward that holds H `segment` steps at a time (the segments
    schedule): its loops over segments cover `segment` steps per iteration."""
    anchors = [("sweep 1: checkpoints", r"# Sweep 1"), ("sweep 2: segments", r"# Sweep 2")]
    by_segment = {}
    for name, entry in index.items():
        if not name.startswith(f"lif-backward-{dtype}-segment"):
            continue
        segment = entry["segment"]
        (function,) = disassemble(entry["cubin"]).values()
        analysis.relocate(function, path)
        counts = analysis.count(
            function, path, anchors,
            lambda loop, segment=segment: 1.0 / (segment * per_thread) if analysis.header_matches(
                loop, r"in range\(.*segments") else 1.0)
        by_segment[segment] = (function, counts, threads, per_thread, segment, "segments")
    return by_segment


def launches(card: Card, kernels: dict, dtype: str, steps: int, neurons: int) -> list:
    """The forward and backward launches of one call on `card`."""
    b = STORAGE_BYTES[dtype]
    elements = steps * neurons
    result = []
    for direction in ("forward", "backward"):
        function, counts, threads, per_thread, chunk, schedule = kernels[direction, dtype]
        by_segment = kernels.get(("backward-segments", dtype))
        if direction == "backward" and by_segment is not None:
            # the launchers' choice: the shortest segment that holds T, else the longest
            segment = min((s for s in by_segment if s >= steps), default=max(by_segment))
            function, counts, threads, per_thread, chunk, schedule = by_segment[segment]
        blocks = -(-neurons // (threads * per_thread))
        instructions = counts.instructions * elements
        mufu = counts.mufu * elements
        notes = []
        if direction == "forward":
            # read x, write the spikes; v_init in, v_last out
            dram = 2 * elements * b + 2 * neurons * b
            inflight = in_flight([(p, 1.0) for p in counts.passes])
        elif schedule == "segments":
            # sweep 2 runs every step once; sweep 1 the steps before the last segment
            segments = -(-steps // chunk)
            reread = (segments - 1) * chunk / steps
            sweep1 = counts.passes[0]
            instructions += (reread - 1) * sweep1.instructions * elements
            mufu += (reread - 1) * sweep1.mufu * elements
            checkpoint_rows = max(segments - 2, 0)
            # read x (once, plus again for the recomputed segments), read grad_spikes, write
            # grad_x; v_init, grad_v_last, grad_v_init; checkpoints written and read back
            dram = ((3 + reread) * elements * b + 3 * neurons * b
                    + 2 * checkpoint_rows * neurons * SCRATCH_BYTES)
            notes.append(f"segment {chunk}: H in registers" + (
                f"; x read {1 + reread:.2f} times, {checkpoint_rows} checkpoint rows"
                if segments > 1 else ", x read once"))
            # sweep 1 runs `reread` times per element (not at all for one segment), sweep 2 once
            inflight = in_flight([(sweep1, reread), *((p, 1.0) for p in counts.passes[1:])])
        else:
            # read x (sweep 1), read grad_spikes, write grad_x (sweep 2); grad_v_last, grad_v_init
            dram = 3 * elements * b + 2 * neurons * b
            per_sm = model.blocks_per_sm(card, threads, function.registers, function.shared_bytes)
            resident = min(blocks, per_sm * card.sms)
            scratch_in_flight = resident * threads * per_thread * steps * SCRATCH_BYTES
            aliased = b == SCRATCH_BYTES
            if scratch_in_flight <= L2_SHARE_FOR_SCRATCH * card.l2_bytes:
                # written and read back from L2; a separate buffer is written back to DRAM once
                # (dirty lines), the aliased one is overwritten by grad_x first
                dram += 0 if aliased else elements * SCRATCH_BYTES
                notes.append("H scratch read back from L2" +
                             ("" if aliased else ", written back once"))
            else:
                dram += 2 * elements * SCRATCH_BYTES
                notes.append("H scratch round trip through DRAM")
            inflight = in_flight([(p, 1.0) for p in counts.passes])
        notes.append(f"{inflight:.0f} B in flight per thread and wait")
        result.append(model.Launch(
            name=direction, blocks=blocks, threads=threads, registers=function.registers,
            shared_bytes=function.shared_bytes, dram_bytes=dram,
            instructions=instructions, mufu=mufu,
            inflight_bytes_per_thread=inflight, notes=notes))
    return result


def model_bytes(dtype: str, steps: int, neurons: int) -> int:
    """SPEC 4 for this project's kernels as the benchmarks count it: read x, write s, read gS,
    write gX, plus the re-read of x the backward needs (the saved residual)."""
    return 5 * steps * neurons * STORAGE_BYTES[dtype]
