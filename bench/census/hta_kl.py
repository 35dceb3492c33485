"""Census of the fused HTA-KL kernels (CUDA csrc/cuda/hta_kl_cuda_kernels.cuh, Triton
triton_kernels/hta_kl.py): one block (program) per row sweeping the row in passes.

Per class, from the SASS: each loop's heaviest path times its trip count per class (a chunk
loop's iteration covers a thread's chunk of classes; a loop over the time steps inside it runs
T times; the radix rounds multiply what they hold). Per-row work (block reductions, histogram
bookkeeping) is spread over the row's classes.

DRAM: a row read from shared memory (CUDA, when the teacher and all steps fit and the copy
leaves two blocks per SM) or re-read while the rows in flight fit in L2 costs the byte model once;
otherwise every global read of every pass goes to DRAM. Bytes in flight per thread (the latency
bound) are what the passes' loops load before they first wait, from the SASS
(sass.loads_in_flight, analysis.bytes_per_round_trip). Both kernels' issue time counts their
few resident warps (model.issue_share with CudaKernels.warp_issue_interval and
TritonKernels.warp_issue_interval, each fitted on the H200 run).
"""

from __future__ import annotations

import math
import os
import re

from . import analysis, build, model
from .machines import Card
from .sass import disassemble

STORAGE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The share of L2 the rows in flight may take and still be re-read from L2 by the later passes.
L2_SHARE_FOR_ROWS = 0.5
# Dynamic shared memory a block may opt in to on Hopper (cudaDevAttrMaxSharedMemoryPerBlockOptin:
# 227 KiB); the launcher raises the kernel's ceiling to it minus the static shared memory.
SHARED_OPTIN = 232448

# Regions of hta_kl_cuda_kernels.cuh: each pass's functions, then the kernel's body (the row copy,
# and the call of each pass, for code whose line info names the call site only).
CUDA_ANCHORS = [
    ("1-2 log-sum-exps", r"^// Passes 1 and 2"),
    ("3 head boundary", r"^// Pass 3"),
    (None, r"^// Passes 4 and 5 walk the row"),
    ("4 row sums", r"^// Pass 4"),
    ("5 gradients", r"^// Pass 5"),
    ("5 prob_mean student gradient", r"^// prob_mean with T > 1"),
    (None, r"^// The kernel\."),
    ("row to shared", r"if \(params\.cache_rows\)"),
    ("1-2 log-sum-exps", r"compute_log_sum_exps\(row"),
    ("3 head boundary", r"find_head_boundary\(row"),
    ("4 row sums", r"compute_row_sums\(row"),
    ("5 gradients", r"write_softmax_gradients\(row"),
    ("5 prob_mean student gradient", r"write_prob_mean_student_gradient\(row"),
    (None, r"^// Launch\."),
]
# Regions of triton_kernels/hta_kl.py: the helpers of each pass (their code is inlined with the
# helpers' own line info), then the kernel's body, then the split kernel's helpers that combine
# its segments' partial results (its body, which calls the passes' helpers, belongs to none).
TRITON_ANCHORS = [
    ("1 normalisers", r"^# Loads and normalisers"),
    ("2 head boundary", r"^# Head selection"),
    ("3 row sums", r"^# Passes 3 and 4"),
    ("4 gradients", r"^def _write_gradients"),
    (None, r"^def _call_constants"),
    ("1 normalisers", r"# ---- Pass 1"),
    ("2 head boundary", r"# ---- Pass 2"),
    ("3 row sums", r"# ---- Pass 3"),
    ("4 gradients", r"# ---- Pass 4"),
    ("split: segments combined", r"^# The split kernel"),
    (None, r"^def _hta_kl_split_kernel"),
    (None, r"^# Launch and registration"),
]
# Loops of the Triton kernel that run only in rare rows: the narrowing rounds (a boundary bucket
# of more than a chunk of classes), the count of a boundary tied in more classes than the
# workspace holds, and the second sum of a prob_mean chunk whose steps all underflow.
TRITON_RARE = ("while (count > CAPACITY)", "_tie_limit_in_row", "_log2_step_mean")
# A loop over a row's classes (or a segment of it), in chunks of BLOCK or sub-blocks of RADIX_BLOCK.
TRITON_ROW_LOOP = r"range\((0, classes|begin, end), "


def _python_function_of(loop) -> str | None:
    """The name of the function whose body holds `loop` (the nearest `def` above it)."""
    lines = open(loop.file).read().splitlines()
    for number in range(loop.header_line - 1, -1, -1):
        match = re.match(r"\s*def (\w+)", lines[number])
        if match:
            return match.group(1)
    return None

# The CUDA launcher's choices, as hta_kl_cuda_kernels.cuh's launcher writes them; census_launch
# mirrors them and checks that these lines are still there (a changed launcher must change the
# census).
CUDA_LAUNCHER_LINES = (
    "thread_chunks >= kMaxThreads ? kMaxThreads : round_up(thread_chunks, kWarpSize));",
    "params.list_capacity = problem.classes < kCandidates ? problem.classes : kCandidates;",
    "2 * params.list_capacity * static_cast<int64_t>(sizeof(radix_key_t<scalar_t>)), kVectorBytes));",
    "params.cache_rows = cache_bytes <= static_cast<double>(shared_limit - front_bytes);",
    "*keeps = caching_blocks >= std::min(kMinCachingBlocksPerSm, streaming_blocks);",
    "static_cast<unsigned>(problem.rows < INT_MAX ? problem.rows : int64_t(INT_MAX));",
    "return round_up(steps, kStepGroupOf<htakl::acc_t<scalar_t>>);",
    "return static_cast<size_t>(2 * step_slots<scalar_t>(steps)) * sizeof(acc_t);",
)


def cuda_constants(text: str) -> dict[str, int]:
    values = {}
    for name in ("kWarpSize", "kMaxThreads", "kRadixBits", "kCandidates", "kChunksPerThread",
                 "kStepGroup", "kVectorBytes", "kMinCachingBlocksPerSm"):
        match = re.search(rf"constexpr int {name} = ([^;]+);", text)
        if match is None:
            raise ValueError(f"HTA-KL CUDA kernel: `constexpr int {name}` not found; the census "
                             f"reads the launch configuration from it")
        values[name] = int(eval(match.group(1), {}, values))  # e.g. "kMaxThreads / kWarpSize"
    for line in CUDA_LAUNCHER_LINES:
        if line not in " ".join(text.split()):
            raise ValueError(f"the HTA-KL CUDA launcher changed (no longer has {line!r}): "
                             f"update bench/census/hta_kl.py's mirror of it")
    return values


class CudaKernels:
    # Cycles from one instruction of a warp to its next (model.Launch.warp_issue_interval), fitted
    # on the H200 run's GPU-bound rows (bench/results/census/after-hta-kl-occupancy/): one value
    # for every pass and dtype; the passes wait on shared-memory and L2 loads, dependent MUFU
    # results and a block barrier at every reduction.
    warp_issue_interval = 19.0

    def __init__(self, source_root: str):
        tags = {"float32": "f", "bfloat16": "13__nv_bfloat16", "float16": "6__half"}
        self.path, cubins = build.cuda_kernel_cubins(source_root, "hta_kl", tags)
        self.constants = cuda_constants(open(self.path).read())
        functions = {name: function for cubin in cubins
                     for name, function in disassemble(cubin).items()}
        # One kernel per dtype and student (the launcher's Student: 0 one softmax, 2 prob_mean).
        self.functions = {(dtype, student): next(
            f for n, f in functions.items()
            if f"hta_kl_fused_kernelI{tag}LNS0_7StudentE{student}EE" in n)
            for dtype, tag in tags.items() for student in (0, 2)}

    def launch(self, card: Card, dtype: str, steps: int, rows: int, classes: int):
        """`steps`: 0 for a 2-D student (the kernel sees T = 1)."""
        steps = max(steps, 1)
        c = self.constants
        b = STORAGE_BYTES[dtype]
        function = self.functions[(dtype, 0 if steps == 1 else 2)]
        width = c["kVectorBytes"] // b
        chunks = math.ceil(classes / width)
        thread_chunks = math.ceil(chunks / c["kChunksPerThread"])
        threads = c["kMaxThreads"] if thread_chunks >= c["kMaxThreads"] else \
            math.ceil(thread_chunks / c["kWarpSize"]) * c["kWarpSize"]
        # step_lse and step_g_sums, each T rounded up to whole step groups (float sums)
        steps_bytes = 2 * math.ceil(steps / c["kStepGroup"]) * c["kStepGroup"] * 4
        # the selection's two candidate lists: float32 keys for every storage but float64
        list_bytes = math.ceil(2 * min(classes, c["kCandidates"]) * 4 / c["kVectorBytes"]) * \
            c["kVectorBytes"]
        front_bytes = steps_bytes + list_bytes
        stride = math.ceil(classes / width) * width
        cache_bytes = (steps + 1) * stride * b
        cached = cache_bytes <= SHARED_OPTIN - function.shared_bytes - front_bytes

        def resident(dynamic_bytes: int) -> int:
            return model.blocks_per_sm(card, threads, function.registers,
                                       function.shared_bytes + dynamic_bytes)
        # ... and leaves kMinCachingBlocksPerSm blocks per SM, or costs none
        cached = cached and resident(front_bytes + cache_bytes) >= min(
            c["kMinCachingBlocksPerSm"], resident(front_bytes))
        shared = function.shared_bytes + front_bytes + (cache_bytes if cached else 0)
        radix_rounds = 32 // c["kRadixBits"]  # float32 keys for every storage but float64
        # The head selection sweeps the row until its candidates fit the shared-memory list
        # (kCandidates keys), listing them in that sweep; later rounds read the list, each
        # keeping the candidates left for the next. A row that fits is swept once; a longer one
        # is taken to fit after its first digit (two sweeps), and the first listed round to leave
        # a few candidates (a warp's worth) to the later ones.
        listed = min(classes, c["kCandidates"])
        sweeps = 1 if classes <= c["kCandidates"] else 2
        groups = math.ceil(steps / c["kStepGroup"])

        # A row's chunks: whole 16-byte chunks (every benchmark row is aligned), then the edge,
        # entered only by a partial last chunk (or by every chunk of an unaligned row).
        edge = 0.0 if classes % width == 0 else 1.0 / width
        # The selection's sweep takes whole warps of whole chunks, then the last, partial warp's
        # chunks (one iteration of one warp per sweep; spread over the row by per_row).
        warp_chunk = c["kWarpSize"] * width
        sweep_edge = 0.0 if classes % warp_chunk == 0 else sweeps * c["kWarpSize"] / threads

        def factor(loop) -> float:
            h = loop.header
            # The selection's loops carry their own round counts (the loop over the digits
            # around them, when matched, counts once).
            if "kWarpChunk <= row.whole_end" in h:  # its sweeps over whole warps
                return sweeps / width
            if "first - lane_offset < classes" in h:  # its sweeps' last warp
                return sweep_edge
            if "i < listed_count" in h:  # its listed rounds: per-row work
                return max(1.0, listed / threads) + (radix_rounds - sweeps - 1)
            if "first < whole_end" in h:
                return 1.0 / width  # one thread's chunk of `width` classes per iteration
            if "first < classes" in h:
                return edge
            if re.search(r"\bt < (row\.|params\.)?(steps|step_count\(\))", h):
                return steps
            if "shift >= 0" in h:
                return 1.0
            if "group < row.steps" in h:
                return groups - 1  # the first group's sums come with the row sums
            if re.search(r"j < kWidth", h):
                return width  # not unrolled where a data-dependent loop sits inside
            if "sweep < row.classes" in h:
                return 0.0  # the ordered count of tied classes: only when the boundary is tied
            return 1.0  # the row loop; the loop over a digit's equal lanes (once, typically)

        def per_row(chain) -> float:
            if any(re.search(r"first < (whole_end|classes);|kWarpChunk <= row\.whole_end", sl.header)
                   for sl in chain):
                return 1.0
            return threads / classes  # per-row work of every thread, spread over the row

        skip = tuple(name for name, runs in (("row to shared", cached),
                                             ("5 prob_mean student gradient", steps > 1)) if not runs)
        counts = analysis.count(function, self.path, CUDA_ANCHORS, factor, per_row, skip)
        # What a thread moves per memory latency, from the SASS (sass.loads_in_flight): over the
        # passes that read the row from global memory (only the copy when the row is held).
        inflight = analysis.bytes_per_round_trip(
            [p for p in counts.passes if p.name == "row to shared" or not cached])
        return function, counts, threads, shared, cached, inflight


def _triton_index(source_root: str, harness: str | None) -> dict:
    return build.triton_cubins(source_root, "hta_kl", harness)


class TritonKernels:
    # As CudaKernels.warp_issue_interval, fitted on the H200 run's six GPU-bound Triton rows
    # (bench/results/census/after-triton-hta-kl-inflight/): 8 cycles. The CUDA kernel's 19 makes
    # them 1.2-2.4x too slow; Triton's passes block-reduce once per chunk of 16 warps' classes
    # (the CUDA kernel's threads sweep their own chunks between reductions) and keep more
    # independent work per warp between waits.
    warp_issue_interval = 8.0

    def __init__(self, source_root: str, harness: str | None = None):
        self.path = os.path.join(source_root, "triton_kernels", "hta_kl.py")
        self.index = _triton_index(source_root, harness)
        self.functions = {}

    def _variant(self, dtype: str, steps: int, classes: int, phase: int | None = None):
        """The compiled variant the launcher picks (`phase`: that phase of the split kernel); a
        2-D student (steps 0) takes the T = 1 kernel where the harness compiles no 2-D one."""
        ours = [e for name, e in self.index.items()
                if name.startswith(f"hta_kl-{dtype}-") and e.get("phase") == phase]
        entries = [e for e in ours if e["steps"] == steps] or [
            e for e in ours if steps == 0 and e["steps"] == 1]
        on_chip_limit = entries[0]["on_chip_limit"]
        on_chip = classes <= on_chip_limit
        block = 1 << max(0, (classes - 1).bit_length()) if on_chip else None
        align = math.gcd(classes, 16)  # the launcher's ALIGN, where the harness compiles it
        for entry in entries:
            if entry["on_chip"] == on_chip and (block is None or entry["block"] == block) and \
                    entry.get("align") in (None, align):
                return entry
        raise ValueError(f"no Triton HTA-KL variant compiled for {dtype}, T = {steps}, "
                         f"C = {classes} (see census/_triton_worker.py)")

    def segments(self, card: Card, dtype: str, steps: int, rows: int, classes: int) -> int:
        """Programs per row as launch_hta_kl splits a chunked row on `card`
        (default_segments, whole chunks per segment); 1: the one-program-per-row kernel."""
        entry = self._variant(dtype, steps, classes)
        return 1 if entry["on_chip"] else split_segments(rows, classes, entry["block"], card.sms)

    def launch(self, card: Card, dtype: str, steps: int, rows: int, classes: int,
               phase: int | None = None, segments: int = 1):
        """The one-program-per-row kernel, or (`phase`) one phase of the split kernel with
        `segments` programs per row (one in phase 4)."""
        entry = self._variant(dtype, steps, classes, phase)
        programs_per_row = 1 if phase in (None, 4) else segments
        if entry["cubin"] not in self.functions:
            (function,) = disassemble(entry["cubin"]).values()
            analysis.relocate(function, self.path)
            self.functions[entry["cubin"]] = function
        function = self.functions[entry["cubin"]]
        threads = entry["num_warps"] * 32
        block = entry["block"]
        radix_block = entry["radix_block"] or block
        # radix rounds over the probability bits below float32's top, where the kernel has them
        rounds = math.ceil(30 / entry["radix_bits"]) if entry["radix_bits"] else 1
        steps = max(steps, 1)

        def factor(loop) -> float:
            h = loop.header
            if any(rare in h or rare == _python_function_of(loop) for rare in TRITON_RARE):
                return 0.0
            if phase == 4 and _python_function_of(loop) == "_compact":
                return 0.0  # phase 3 copied the bucket; phase 4 copies it only after narrowing
            if re.search(TRITON_ROW_LOOP + r"RADIX_BLOCK\)", h):
                return threads / radix_block
            if re.search(TRITON_ROW_LOOP + r"BLOCK\)", h):
                return threads / block
            if re.search(r"range\((1, )?steps\)", h):
                return steps
            if "RADIX_BITS)" in h:
                return rounds
            if "TOP_BIT + 1" in h:
                return 30  # the on-chip bisection, one probability bit per iteration
            if "range(key_bits)" in h:
                return 23  # the bisection of an octave's keys, one mantissa bit per iteration
            return 1.0

        def per_row(chain) -> float:
            if any(re.search(TRITON_ROW_LOOP, sl.header) for sl in chain):
                return 1.0
            return threads * programs_per_row / classes

        counts = analysis.count(function, self.path, TRITON_ANCHORS, factor, per_row)
        # A chunked row's loops wait on their loads (sass.loads_in_flight); a row held on chip is
        # loaded once, outside any loop: a thread's chunk of one slice is in flight together.
        inflight = analysis.bytes_per_round_trip(counts.passes) or \
            max(1, block // threads) * STORAGE_BYTES[dtype]
        return function, counts, threads, entry["shared"], entry["on_chip"], inflight


def model_bytes(dtype: str, steps: int, rows: int, classes: int) -> int:
    """SPEC 4: 3 E b for a 2-D student, (2T + 1) E b for [T, R, C], E = R C."""
    elements = rows * classes
    return (3 if steps == 0 else 2 * steps + 1) * elements * STORAGE_BYTES[dtype]


def launches(card: Card, kernels, dtype: str, steps: int, rows: int, classes: int) -> list:
    """The launches of a call, each with its counts: one, or the split kernel's six phases where
    the Triton launcher splits few long rows (2-D student: steps = 0)."""
    segments = kernels.segments(card, dtype, steps, rows, classes) \
        if hasattr(kernels, "segments") else 1
    if segments == 1:
        return [launch(card, kernels, dtype, steps, rows, classes)]
    return [split_launch(card, kernels, dtype, steps, rows, classes, phase, segments)
            for phase in SPLIT_PHASES]


def split_segments(rows: int, classes: int, chunk: int, sms: int) -> int:
    """The segments launch_hta_kl splits each of `rows` chunked rows in on a card of `sms`
    multiprocessors (triton_kernels/hta_kl.py: split_segments, then whole chunks per segment;
    tests/test_census.py checks the two agree). The census does not import the kernel module,
    which registers its op with PyTorch."""
    if rows >= sms:
        return 1
    segments = max(1, min(-(-2 * sms // rows), -(-classes // chunk)))
    length = -(-(-(-classes // segments)) // chunk) * chunk
    return -(-classes // length)


# The split kernel's phases (triton_kernels/hta_kl.py, _hta_kl_split_kernel): 1 reads the rows
# (normalisers) and 6 writes the gradients; 4 runs one program per row.
SPLIT_PHASES = (1, 2, 3, 4, 5, 6)


def split_launch(card: Card, kernels, dtype: str, steps: int, rows: int, classes: int,
                 phase: int, segments: int):
    """One phase of the split kernel. Its rows are few (fewer than SMs): when they fit in L2
    the first phase reads them from DRAM, the last writes the gradients, and the phases between
    re-read them from L2."""
    slices = max(steps, 1)
    function, counts, threads, shared, _, inflight = kernels.launch(
        card, dtype, steps, rows, classes, phase=phase, segments=segments)
    b = STORAGE_BYTES[dtype]
    elements = rows * classes
    useful = model_bytes(dtype, steps, rows, classes)
    reads = (slices + 1) * elements * b
    requested = sum(p.global_bytes for p in counts.passes) * elements
    if reads <= L2_SHARE_FOR_ROWS * card.l2_bytes:
        dram = {1: min(useful, reads), 6: max(0, useful - reads)}.get(phase, 0)
        notes = ["re-reads hit L2"]
    else:
        dram = requested
        notes = ["re-reads from DRAM"]
    return model.Launch(
        name=f"hta_kl split {phase}", blocks=rows * (1 if phase == 4 else segments),
        threads=threads, registers=function.registers, shared_bytes=shared, dram_bytes=dram,
        instructions=counts.instructions * elements, mufu=counts.mufu * elements,
        inflight_bytes_per_thread=inflight, l2_bytes=requested, notes=notes,
        warp_issue_interval=kernels.warp_issue_interval), counts


def launch(card: Card, kernels, dtype: str, steps: int, rows: int, classes: int):
    """The one launch of a call (2-D student: steps = 0)."""
    slices = max(steps, 1)
    function, counts, threads, shared, held, inflight = kernels.launch(card, dtype, steps, rows,
                                                                      classes)
    b = STORAGE_BYTES[dtype]
    elements = rows * classes
    per_sm = model.blocks_per_sm(card, threads, function.registers, shared)
    row_bytes = (slices + 1) * classes * b
    in_flight = min(rows, per_sm * card.sms) * row_bytes
    notes = []
    useful = model_bytes(dtype, steps, rows, classes)
    requested = sum(p.global_bytes for p in counts.passes) * elements
    if held:
        dram = useful
        notes.append("row held on chip")
    elif in_flight <= L2_SHARE_FOR_ROWS * card.l2_bytes:
        dram = useful
        notes.append("re-reads hit L2")
    else:
        dram = max(useful, requested)
        notes.append("re-reads from DRAM")
    return model.Launch(
        name="hta_kl", blocks=rows, threads=threads, registers=function.registers,
        shared_bytes=shared, dram_bytes=dram, instructions=counts.instructions * elements,
        mufu=counts.mufu * elements, inflight_bytes_per_thread=inflight,
        l2_bytes=requested, notes=notes,
        warp_issue_interval=kernels.warp_issue_interval), counts
