"""Thin nn.Module wrappers around :func:`htakl_kernels.hta_kl_div`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hta_kl import hta_kl_div


class HTAKLLoss(nn.Module):
    """`HTAKLLoss(**options)(student, teacher)` is `hta_kl_div(student, teacher, **options)`."""

    def __init__(self, *, temperature: float = 2.0, delta: float = 0.5,
                 time_reduction: str = "prob_mean", detach_weights: bool = False,
                 reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(temperature=temperature, delta=delta, time_reduction=time_reduction,
                            detach_weights=detach_weights, reduction=reduction, backend=backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return hta_kl_div(student, teacher, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class SpikingKDLoss(HTAKLLoss):
    """SPEC 1.7's objective: `(1 - alpha) * CE(mean_t student, labels) + alpha * HTA-KL`.

    `student` is `[T, ..., C]` (per-timestep logits, averaged over T for the cross-entropy) or
    `[..., C]`; `labels` holds class indices of shape `teacher.shape[:-1]`.
    """

    def __init__(self, alpha: float = 0.5, **options) -> None:
        super().__init__(**options)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.shape != teacher.shape[:-1]:
            raise ValueError(
                f"labels must be a tensor of the teacher's row shape {tuple(teacher.shape[:-1])}, "
                f"got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}"
            )
        # alpha goes into the kernel with the loss (hta_kl_div's _weight), so that the sum below
        # backpropagates to the kernel's saved gradient without scaling it; alpha = 0 keeps the
        # product, so that a NaN distillation term still shows.
        if self.alpha > 0:
            distill = hta_kl_div(student, teacher, **self.options, _weight=self.alpha)
        else:
            distill = self.alpha * super().forward(student, teacher)
        mean_logits = student.mean(dim=0) if student.dim() == teacher.dim() + 1 else student
        classes = teacher.shape[-1]
        cross_entropy = F.cross_entropy(mean_logits.reshape(-1, classes), labels.reshape(-1))
        return (1 - self.alpha) * cross_entropy + distill

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()
