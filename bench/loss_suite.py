"""HTA-KL loss suite: every built backend against the reference, its compiled form, the F.kl_div
floor and Liger-Kernel's distillation losses."""

from __future__ import annotations

import importlib
import math
import re

import torch
import torch.nn.functional as F

import htakl_kernels
from htakl_kernels import reference

from .runner import QUICK_SKIPS_COMPILE, Case, Implementation, Inputs, backend_implementations

TEMPERATURE = 2.0
DELTA = 0.5

# (steps, rows, classes); steps None = a 2-D student, else a [steps, rows, classes] student.
CPU_SHAPES = [(None, 256, 1000), (None, 64, 32000), (None, 8, 131072)]
GPU_SHAPES = [
    (None, 4096, 1000), (None, 4096, 32000), (None, 1024, 131072), (None, 256, 262144),
    (4, 1024, 32000),
]
QUICK_SHAPES = {
    "cpu": [(None, 32, 1000), (None, 8, 4096), (4, 16, 1000)],
    "cuda": [(None, 4096, 1000), (None, 1024, 32000), (4, 256, 32000)],
}

EAGER_REFERENCE = "reference (eager)"
COMPILED_REFERENCE = "reference (torch.compile)"
KL_DIV_FLOOR = "F.kl_div (floor)"


def shapes(device: torch.device, quick: bool):
    if quick:
        return QUICK_SHAPES[device.type]
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


SHAPE_LABEL = re.compile(r"(?:T(\d+)x)?(\d+)x(\d+)")
SHAPE_FORMAT = "ROWSxC (a 2-D student) or TxROWSxC (a [T, ROWS, C] prob_mean student), e.g. T4x8x131072"


def parse_shape(label: str):
    """(steps, rows, classes) of a case label as _label writes it; None if it is not one."""
    match = SHAPE_LABEL.fullmatch(label)
    if match is None:
        return None
    steps, rows, classes = match.groups()
    return (None if steps is None else int(steps)), int(rows), int(classes)


def _label(steps, rows, classes) -> str:
    return f"{rows}x{classes}" if steps is None else f"T{steps}x{rows}x{classes}"


def make_case(steps, rows, classes, dtype, device) -> Case:
    elements = rows * classes
    size = torch.empty((), dtype=dtype).element_size()
    # SPEC 4: 2-D reads student and teacher and writes the student's gradient (3 E b); a time
    # input reads T student slices and the teacher and writes T gradient slices ((2T + 1) E b).
    slices = 1 if steps is None else steps
    student_shape = (rows, classes) if steps is None else (steps, rows, classes)

    def make_inputs(generator):
        # Logits spread like a trained classifier's (a few dominant classes), never constant.
        student = (3.0 * torch.randn(student_shape, generator=generator, device=device)).to(dtype)
        teacher = (3.0 * torch.randn((rows, classes), generator=generator, device=device)).to(dtype)
        student.requires_grad_(True)
        return Inputs(args=(student, teacher), wrt=(student,))

    return Case(
        label=_label(steps, rows, classes),
        dims={"steps": steps, "rows": rows, "classes": classes},
        dtype=dtype,
        elements=slices * elements,
        model_bytes=(2 * slices + 1) * elements * size,
        make_inputs=make_inputs,
    )


def _student_log_probs(student: torch.Tensor) -> torch.Tensor:
    """log q of SPEC 1.2 in plain PyTorch: a 2-D student, or prob_mean over a time input."""
    log_probs = F.log_softmax(student / TEMPERATURE, dim=-1)
    if student.dim() == 3:
        return torch.logsumexp(log_probs, dim=0) - math.log(student.shape[0])
    return log_probs


def _kl_div_floor(student, teacher):
    # The cheapest loss anyone would call "KL distillation": no sort, no weights.
    return F.kl_div(
        _student_log_probs(student), F.log_softmax(teacher / TEMPERATURE, dim=-1),
        log_target=True, reduction="batchmean",
    )


def _backend_call(name):
    def call(student, teacher):
        return htakl_kernels.hta_kl_div(
            student, teacher, temperature=TEMPERATURE, delta=DELTA, backend=name
        )

    return call


def _reference_call(function):
    def call(student, teacher):
        return function(student, teacher, temperature=TEMPERATURE, delta=DELTA)

    return call


def _liger_implementations(device: torch.device) -> list[Implementation]:
    names = ("Liger JSD (beta=0.5)", "Liger KL-div")
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except ImportError as error:
        reason = f"liger-kernel is not importable ({error})"
        return [Implementation(name, "baseline", unavailable=reason) for name in names]
    if device.type != "cuda":
        reason = "Liger-Kernel's Triton kernels run on CUDA tensors only"
        return [Implementation(name, "baseline", unavailable=reason) for name in names]
    jsd = liger.LigerJSD(beta=0.5)
    kl_div = liger.LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def jsd_call(student, teacher):
        return jsd(_student_log_probs(student), F.log_softmax(teacher / TEMPERATURE, dim=-1))

    def kl_div_call(student, teacher):
        return kl_div(_student_log_probs(student), F.log_softmax(teacher / TEMPERATURE, dim=-1))

    return [
        Implementation(names[0], "baseline", jsd_call),
        Implementation(names[1], "baseline", kl_div_call),
    ]


def implementations(device: torch.device, quick: bool) -> list[Implementation]:
    found = backend_implementations(device, _backend_call)
    found.append(Implementation(EAGER_REFERENCE, "baseline", _backend_call("reference")))
    if quick:
        found.append(Implementation(COMPILED_REFERENCE, "baseline", unavailable=QUICK_SKIPS_COMPILE))
    else:
        compiled = torch.compile(reference.hta_kl_div, dynamic=False)
        found.append(Implementation(COMPILED_REFERENCE, "baseline", _reference_call(compiled)))
    found.append(Implementation(KL_DIV_FLOOR, "baseline", _kl_div_floor))
    found.extend(_liger_implementations(device))
    return found


def cases(device: torch.device, dtypes, quick: bool, chosen=None) -> list[Case]:
    """Every dtype of every shape: `chosen` (parsed by parse_shape) or the suite's own."""
    return [
        make_case(steps, rows, classes, dtype, device)
        for dtype in dtypes
        for steps, rows, classes in (chosen or shapes(device, quick))
    ]
