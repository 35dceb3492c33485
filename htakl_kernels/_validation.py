"""Argument checks shared by every backend: bad input fails here, before any kernel runs."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROW_REDUCTIONS = ("batchmean", "sum", "none")
TIME_REDUCTIONS = ("prob_mean", "logit_mean")


class HtaKlShape(NamedTuple):
    """How a (student, teacher) pair maps onto SPEC 1's rows."""

    time_input: bool  # student has one extra leading time dimension
    steps: int  # T (1 without a time dimension)
    rows: int  # product of the teacher's leading dimensions
    classes: int  # C
    rows_shape: torch.Size  # teacher.shape[:-1], the shape of reduction="none"

    def row_scale(self, reduction: str, weight: float) -> float:
        """SPEC 1.7: each row's share of the reduced loss (1/R for batchmean), times `weight`;
        the kernels apply it to every row, so that what is left to do is a sum."""
        return (1.0 / self.rows if reduction == "batchmean" else 1.0) * weight


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def is_real_number(value: object) -> bool:
    """A Python or NumPy real scalar, not a bool."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, without the ABC's slower check
        return True
    return isinstance(value, numbers.Real) and kind is not bool


def check_real(name: str, value: object) -> float:
    """A finite real number (a Python or NumPy scalar, not a bool), as a float."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_positive_finite(name: str, value: object) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_alpha(alpha: object) -> float:
    """SpikingKDLoss's mixing weight: a real number in [0, 1], as a float."""
    if not is_real_number(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_first_order_backward(function: str) -> None:
    """Refuse a backward run with create_graph=True: the kernels' gradients are computed, not
    traced, so their own gradient would silently be missing (PyTorch's once_differentiable
    refuses it too). The reference backend is differentiable to any order. A traced backward
    (torch.compile) runs in grad mode without asking for a second order, and passes."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{function}'s kernel backward is not differentiable: double backward "
            f"(create_graph=True) is not supported; use backend='reference' for higher-order "
            f"gradients"
        )


def check_float_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {value.dtype}"
        )


def check_hta_kl_options(temperature: float, delta: float, time_reduction: str,
                         detach_weights: bool, reduction: str) -> None:
    """Validate hta_kl_div's scalar options (SPEC 1)."""
    check_positive_finite("temperature", temperature)
    if not is_real_number(delta) or not 0 < delta <= 1:
        raise ValueError(f"delta must be a number in (0, 1], got {delta!r}")
    check_choice("time_reduction", time_reduction, TIME_REDUCTIONS)
    check_bool("detach_weights", detach_weights)
    check_choice("reduction", reduction, ROW_REDUCTIONS)


def check_rows_for_reduction(rows: int, reduction: str) -> None:
    """batchmean divides by the number of rows, so an empty batch refuses it (sum and none
    are defined there)."""
    if rows == 0 and reduction == "batchmean":
        raise ValueError(
            "reduction='batchmean' of an empty batch is undefined (0 rows); use reduction='sum' "
            "(gives 0) or 'none' (gives an empty tensor)"
        )


def check_hta_kl_args(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    delta: float,
    time_reduction: str,
    detach_weights: bool,
    reduction: str,
) -> HtaKlShape:
    """Validate hta_kl_div's arguments (SPEC 1) and return the row layout."""
    check_float_tensor("student", student)
    check_float_tensor("teacher", teacher)
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"student and teacher must have the same dtype, got student {student.dtype} and "
            f"teacher {teacher.dtype}; cast one of them"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student and teacher must be on the same device, got student on {student.device} "
            f"and teacher on {teacher.device}"
        )
    check_hta_kl_options(temperature, delta, time_reduction, detach_weights, reduction)
    if teacher.dim() < 1:
        raise ValueError("teacher must have at least one dimension (the classes), got a 0-d tensor")
    if student.dim() not in (teacher.dim(), teacher.dim() + 1):
        raise ValueError(
            f"student must have the teacher's shape {tuple(teacher.shape)} or one extra leading "
            f"time dimension [T, *{tuple(teacher.shape)}], got {tuple(student.shape)}"
        )
    time_input = student.dim() == teacher.dim() + 1
    per_step_shape = student.shape[1:] if time_input else student.shape
    if per_step_shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student and teacher must have the same number of classes C (last dimension), got "
            f"student C={per_step_shape[-1]} and teacher C={teacher.shape[-1]}"
        )
    if per_step_shape != teacher.shape:
        raise ValueError(
            f"student's per-step shape {tuple(per_step_shape)} must equal the teacher's shape "
            f"{tuple(teacher.shape)}"
        )
    classes = teacher.shape[-1]
    if classes < 1:
        raise ValueError("teacher must have at least one class (C >= 1), got C=0")
    steps = student.shape[0] if time_input else 1
    if steps < 1:
        raise ValueError("student's time dimension T must be at least 1, got T=0")
    rows = teacher.numel() // classes
    check_rows_for_reduction(rows, reduction)
    return HtaKlShape(time_input, steps, rows, classes, teacher.shape[:-1])
