"""Fused linear + HTA-KL suite: `fused_linear_hta_kl_div` against the unfused compositions
(`F.linear` for both heads, then `hta_kl_div` on the kernel backend, or on the reference).

A spiking student `[T, N, H]` with a bias-carrying head `[C, H]` distils from a frozen teacher
head `[C, H]` (teacher tensors need no gradient, as in training); gradients go to the student's
features, weight and bias. Besides time, each variant's peak memory is measured: on CUDA by the
allocator (in the runner), on CPU in a fresh child process per variant (`python -m
bench.linear_suite --peak-memory ...`), as its peak resident set during one forward + backward
above its resident set just before (the kernel's peak-RSS counter reset through
/proc/self/clear_refs), so that memory the parent's allocator keeps from earlier variants
cannot hide or inflate it.

On CPU every call takes seconds (the matmuls dominate), so this suite times with 2 samples
(over the usual minimum run time; the IQR is then their difference) and no warm-up beyond the
runner's first call, and runs the reference only on shapes whose
intermediates stay well within a CPU machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import htakl_kernels

from . import measure, runner
from .runner import Case, Implementation, Inputs, backend_implementations

TEMPERATURE = 2.0
DELTA = 0.5

# (steps, rows, hidden, classes). The second CPU shape doubles N, and so the logits, at the same
# chunk size (which depends on T, C and the dtype only) and the same matmul work (H halved, so
# that a 2-core run stays within minutes): the fused path's peak memory should not move, the
# unfused paths' should double.
CPU_SHAPES = [(4, 2048, 256, 32000), (4, 4096, 128, 32000)]
GPU_SHAPES = [(4, 4096, 1024, 32000), (4, 8192, 1024, 32000), (4, 4096, 1024, 131072)]
QUICK_SHAPES = {
    "cpu": [(2, 64, 32, 1000), (None, 96, 16, 2000)],
    "cuda": [(4, 1024, 512, 32000)],
}
# The reference keeps ~25 bytes per logit for its backward and takes tens of seconds per call on
# a 2-core CPU at 8192 x 32000 logits: larger CPU shapes leave it out.
CPU_REFERENCE_MAX_LOGITS = 4 * 2048 * 32000

FUSED_PREFIX = "htakl "  # backend_implementations' labels: the fused function on that backend
UNFUSED_KERNEL = "F.linear + hta_kl_div (kernel)"
UNFUSED_REFERENCE = "F.linear + reference"
MEMORY_METHOD = (
    "peak extra MiB: on CPU the peak resident set of one fwd+bwd in a fresh child process above "
    "its resident set before the call (/proc VmHWM after clear_refs, minus VmRSS); on CUDA the "
    "allocator's peak above what was allocated before"
)
DESCRIPTION = (
    "bytes (for GB/s): the least any implementation moves, reading the features and weights and "
    "writing the student's gradients, (2 T N H_s + N H_t + 2 C H_s + C H_t) b; the unfused paths "
    "also write and read the [T, N, C] and [N, C] logits and their gradient. " + MEMORY_METHOD
)


def shapes(device: torch.device, quick: bool):
    if quick:
        return QUICK_SHAPES[device.type]
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def _label(steps, rows, hidden, classes) -> str:
    student = f"{rows}x{hidden}" if steps is None else f"T{steps}x{rows}x{hidden}"
    return f"{student} @ {classes}x{hidden}"


def make_case(steps, rows, hidden, classes, dtype, device) -> Case:
    size = torch.empty((), dtype=dtype).element_size()
    slices = 1 if steps is None else steps
    student_shape = (rows, hidden) if steps is None else (steps, rows, hidden)

    def make_inputs(generator):
        def normal(*shape, scale=1.0):
            return (scale * torch.randn(shape, generator=generator, device=device)).to(dtype)

        # Features of unit spread and heads scaled like nn.Linear's initialization times 3, so
        # that the logits spread like a trained classifier's (scale ~3), as in the loss suite.
        student_input = normal(*student_shape).requires_grad_(True)
        student_weight = normal(classes, hidden, scale=3 / hidden ** 0.5).requires_grad_(True)
        student_bias = normal(classes, scale=0.1).requires_grad_(True)
        teacher_input = normal(rows, hidden)
        teacher_weight = normal(classes, hidden, scale=3 / hidden ** 0.5)
        teacher_bias = normal(classes, scale=0.1)
        args = (student_input, student_weight, student_bias, teacher_input, teacher_weight,
                teacher_bias)
        return Inputs(args=args, wrt=(student_input, student_weight, student_bias))

    return Case(
        label=_label(steps, rows, hidden, classes),
        dims={"steps": steps, "rows": rows, "hidden": hidden, "classes": classes},
        dtype=dtype,
        elements=slices * rows * classes,  # logits: saved B/elem is per student logit
        model_bytes=(2 * slices * rows * hidden + rows * hidden + 3 * classes * hidden) * size,
        make_inputs=make_inputs,
    )


def _fused_call(backend):
    def call(student_input, student_weight, student_bias, teacher_input, teacher_weight,
             teacher_bias):
        return htakl_kernels.fused_linear_hta_kl_div(
            student_input, student_weight, teacher_input, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=TEMPERATURE,
            delta=DELTA, backend=backend,
        )

    return call


def _unfused_call(backend):
    def call(student_input, student_weight, student_bias, teacher_input, teacher_weight,
             teacher_bias):
        return htakl_kernels.hta_kl_div(
            F.linear(student_input, student_weight, student_bias),
            F.linear(teacher_input, teacher_weight, teacher_bias),
            temperature=TEMPERATURE, delta=DELTA, backend=backend,
        )

    return call


def implementations(device: torch.device, quick: bool) -> list[Implementation]:
    found = backend_implementations(device, _fused_call)
    found.append(Implementation(UNFUSED_KERNEL, "baseline", _unfused_call("auto")))
    found.append(Implementation(UNFUSED_REFERENCE, "baseline", _unfused_call("reference")))
    return found


def cases(device: torch.device, dtypes, quick: bool) -> list[Case]:
    return [
        make_case(*shape, dtype, device) for dtype in dtypes for shape in shapes(device, quick)
    ]


def _runs_here(implementation: Implementation, case: Case, device: torch.device) -> Implementation:
    logits = (case.dims["steps"] or 1) * case.dims["rows"] * case.dims["classes"]
    if (implementation.name == UNFUSED_REFERENCE and device.type == "cpu"
            and logits > CPU_REFERENCE_MAX_LOGITS and implementation.call is not None):
        return Implementation(implementation.name, implementation.role, unavailable=(
            f"reference left out above {CPU_REFERENCE_MAX_LOGITS} logits on CPU (its backward "
            f"keeps ~25 B per logit and a call takes tens of seconds)"))
    return implementation


def run_case(case: Case, implementations: list[Implementation], *, device: torch.device, timer,
             **options) -> list[dict]:
    """The runner's `run_case`, with this suite's CPU timer and each row's peak memory measured
    in a child process on CPU."""
    if device.type == "cpu":
        timer = measure.CpuTimer(min_run_time_s=timer.min_run_time_s, min_samples=2,
                                 warmup_calls=0)
    implementations = [_runs_here(implementation, case, device) for implementation in implementations]
    rows = runner.run_case(case, implementations, device=device, timer=timer, **options)
    if device.type == "cpu":
        for row in rows:
            if row["status"] == "ok":
                row["peak_extra_bytes"] = _child_peak_bytes(case, row["implementation"])
                row["peak_memory"] = MEMORY_METHOD
    return rows


def _child_peak_bytes(case: Case, implementation: str) -> int:
    request = {"dims": case.dims, "dtype": str(case.dtype).removeprefix("torch."),
               "implementation": implementation, "threads": torch.get_num_threads()}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.linear_suite", "--peak-memory", json.dumps(request)],
        capture_output=True, text=True, check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"peak-memory child for {implementation} failed: "
                           f"{completed.stderr.strip()[-2000:]}")
    return int(json.loads(completed.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_peak(request: dict) -> int:
    """Peak resident bytes of one fwd+bwd above the resident set before it (this process)."""
    torch.set_num_threads(request["threads"])
    device = torch.device("cpu")
    dtype = getattr(torch, request["dtype"])
    dims = request["dims"]
    by_name = {implementation.name: implementation for implementation in implementations(device, True)}
    implementation = by_name[request["implementation"]]
    generator = torch.Generator(device=device)
    generator.manual_seed(0)

    def forward_backward(inputs):
        output = implementation.call(*inputs.args)
        return torch.autograd.grad((output,), inputs.wrt)

    # Load every library and kernel on a tiny shape first: their code and buffers are not the
    # call's memory.
    tiny = make_case(dims["steps"], 8, 8, 16, dtype, device)
    forward_backward(tiny.make_inputs(generator))
    inputs = make_case(dims["steps"], dims["rows"], dims["hidden"], dims["classes"], dtype,
                       device).make_inputs(generator)
    before_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM, the peak resident set, to the current one
    gradients = forward_backward(inputs)
    peak_kib = _status_kib("VmHWM")
    del gradients
    return (peak_kib - before_kib) * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_suite",
                                     description="peak memory of one variant (run by the suite)")
    parser.add_argument("--peak-memory", required=True, metavar="JSON",
                        help='{"dims": ..., "dtype": ..., "implementation": ..., "threads": ...}')
    arguments = parser.parse_args(argv)
    peak = _measure_peak(json.loads(arguments.peak_memory))
    print(json.dumps({"peak_extra_bytes": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
