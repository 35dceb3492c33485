"""Census of the multi-step LIF kernels (CUDA csrc/cuda/lif_cuda.cu, Triton triton_kernels/lif.py).

Both run one thread (CUDA) or one lane group (Triton) per neuron looping over time: the forward
reads x and writes the spikes; the backward recomputes H[t] into a float32 scratch (sweep 1:
reads x), then walks t down (sweep 2: reads H and the spikes' gradient, writes x's gradient).
The scratch is grad_x itself where x is float32 (csrc: `h_scratch` may alias `grad_x`; Triton:
H_IN_GRAD_X), a separate float32 buffer otherwise.
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
        raise ValueError(f"lif_cuda.cu: `constexpr int {name} = ...;` not found; the census reads "
                         f"the launch configuration from it")
    return int(match.group(1))


def cuda_kernels(source_root: str) -> dict:
    """{(direction, dtype): (function, counts, threads, neurons per thread, chunk)} of the CUDA
    kernels, with the launch constants read from the source."""
    path = os.path.join(source_root, "csrc", "cuda", "lif_cuda.cu")
    text = open(path).read()
    threads = cuda_constant(text, "kThreads")  # blocks_for(): one thread per neuron
    chunk = cuda_constant(text, "kChunk")  # time steps whose loads a thread issues together
    functions = disassemble(build.cuda_cubin(source_root, "lif_cuda.cu"))
    names = {"float32": "IffEE", "bfloat16": "I13__nv_bfloat16fEE"}
    anchors = {"forward": [("forward", r"lif_forward_kernel\(")],
               "backward": [("recompute H", r"// Sweep 1"), ("gradient", r"// Sweep 2")]}

    def factor(loop) -> float:
        # the chunked time loops: one iteration covers `chunk` steps of one neuron
        return 1.0 / chunk if analysis.header_matches(loop, r"kChunk") else 1.0

    kernels = {}
    for direction in ("forward", "backward"):
        for dtype, tag in names.items():
            function = next(f for n, f in functions.items()
                            if f"lif_{direction}_kernel{tag}" in n)
            counts = analysis.count(function, path, anchors[direction], factor)
            kernels[direction, dtype] = (function, counts, threads, 1, chunk)
    return kernels


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
            kernels[direction, dtype] = (function, counts, threads, per_thread, 1)
    return kernels


def launches(card: Card, kernels: dict, dtype: str, steps: int, neurons: int) -> list:
    """The forward and backward launches of one call on `card`."""
    b = STORAGE_BYTES[dtype]
    elements = steps * neurons
    result = []
    for direction in ("forward", "backward"):
        function, counts, threads, per_thread, chunk = kernels[direction, dtype]
        blocks = -(-neurons // (threads * per_thread))
        in_chunk = min(chunk, steps)  # loads a thread issues before it waits
        notes = []
        if direction == "forward":
            # read x, write the spikes; v_init in, v_last out
            dram = 2 * elements * b + 2 * neurons * b
            inflight = in_chunk * per_thread * b
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
            # sweep 1 has the fewest bytes in flight: x alone
            inflight = in_chunk * per_thread * b
        result.append(model.Launch(
            name=direction, blocks=blocks, threads=threads, registers=function.registers,
            shared_bytes=function.shared_bytes, dram_bytes=dram,
            instructions=counts.instructions * elements, mufu=counts.mufu * elements,
            inflight_bytes_per_thread=inflight, notes=notes))
    return result


def model_bytes(dtype: str, steps: int, neurons: int) -> int:
    """SPEC 4 for this project's kernels as the benchmarks count it: read x, write s, read gS,
    write gX, plus the re-read of x the backward needs (the saved residual)."""
    return 5 * steps * neurons * STORAGE_BYTES[dtype]
