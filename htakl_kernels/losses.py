"""Thin nn.Module wrappers around :func:`htakl_kernels.hta_kl_div`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._backends import BACKENDS
from ._validation import check_alpha, check_choice, check_hta_kl_options
from .distributed import is_parallel, vocab_parallel_cross_entropy
from .hta_kl import hta_kl_div, weighted_hta_kl_div


class HTAKLLoss(nn.Module):
    """`HTAKLLoss(**options)(student, teacher)` is `hta_kl_div(student, teacher, **options)`.

    The options are checked here and kept as attributes of the same names, which the next call
    reads (e.g. a temperature schedule may assign `loss.temperature`). `group` (a process group
    whose ranks each hold a slice of the classes) makes it the vocab-parallel loss of
    `htakl_kernels.distributed`.
    """

    def __init__(self, *, temperature: float = 2.0, delta: float = 0.5,
                 time_reduction: str = "prob_mean", detach_weights: bool = False,
                 reduction: str = "batchmean", backend: str = "auto", group=None) -> None:
        super().__init__()
        check_hta_kl_options(temperature, delta, time_reduction, detach_weights, reduction)
        check_choice("backend", backend, BACKENDS)
        self.temperature, self.delta, self.time_reduction = temperature, delta, time_reduction
        self.detach_weights, self.reduction, self.backend = detach_weights, reduction, backend
        self.group = group

    @property
    def options(self) -> dict:
        """hta_kl_div's keyword arguments, as the attributes hold them now."""
        return {name: getattr(self, name) for name in _OPTION_NAMES}

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return hta_kl_div(student, teacher, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


_OPTION_NAMES = ("temperature", "delta", "time_reduction", "detach_weights", "reduction", "backend",
                 "group")
# The cross-entropy's reduction matching each of hta_kl_div's (both terms reduce the same rows).
_CROSS_ENTROPY_REDUCTION = {"batchmean": "mean", "sum": "sum", "none": "none"}


class SpikingKDLoss(HTAKLLoss):
    """SPEC 1.7's objective: `(1 - alpha) * CE(mean_t student, labels) + alpha * HTA-KL`.

    `student` is `[T, ..., C]` (per-timestep logits, averaged over T for the cross-entropy) or
    `[..., C]`; `labels` holds class indices of shape `teacher.shape[:-1]`. `reduction` applies to
    both terms: "batchmean" averages them over the rows, "sum" adds them up, and "none" gives
    each row's objective (shape `teacher.shape[:-1]`). With `group`, each rank holds a slice of
    the classes and the same labels (global class indices); the cross-entropy is then computed
    over the whole rows too (`htakl_kernels.distributed.vocab_parallel_cross_entropy`).
    """

    def __init__(self, alpha: float = 0.5, **options) -> None:
        super().__init__(**options)
        self.alpha = check_alpha(alpha)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        alpha = check_alpha(self.alpha)
        if not isinstance(labels, torch.Tensor) or labels.shape != teacher.shape[:-1]:
            raise ValueError(
                f"labels must be a tensor of the teacher's row shape {tuple(teacher.shape[:-1])}, "
                f"got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}"
            )
        # alpha goes into the kernel with the loss (weighted_hta_kl_div), so that the sum below
        # backpropagates to the kernel's saved gradient without scaling it; alpha = 0 keeps the
        # product, so that a NaN distillation term still shows.
        if alpha > 0:
            distill = weighted_hta_kl_div(student, teacher, weight=alpha, **self.options)
        else:
            distill = alpha * super().forward(student, teacher)
        mean_logits = student.mean(dim=0) if student.dim() == teacher.dim() + 1 else student
        classes = teacher.shape[-1]
        if is_parallel(self.group):
            cross_entropy = vocab_parallel_cross_entropy(
                mean_logits, labels, group=self.group,
                reduction=_CROSS_ENTROPY_REDUCTION[self.reduction])
        else:
            cross_entropy = F.cross_entropy(
                mean_logits.reshape(-1, classes), labels.reshape(-1),
                reduction=_CROSS_ENTROPY_REDUCTION[self.reduction],
            ).reshape(distill.shape)
        return (1 - alpha) * cross_entropy + distill

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()
