"""The vocab-parallel HTA-KL's phases on one rank's slice of the classes (htakl_kernels.distributed
runs them, with the collectives between them).

Contract of the phase ops (schemas `_library.HTA_KL_SLICE_SCHEMAS`). Every tensor is contiguous,
every floating one in the accumulation dtype (float32, or float64 for float64 inputs); integer
ones are int64. `[K, R, c]` stacks K softmax
streams (the teacher, then the student's) of R rows over the slice's c classes (c may be 0):

    hta_kl_slice_max(x [K, R, c]) -> [K, R]: each row's maximum over the slice, -inf for an
        empty slice. NaN is left out (a MAX collective need not propagate it); it reaches every
        rank through the sums of exponentials that follow.
    hta_kl_slice_exp_sums(x, row_max [K, R], inv_tau) -> (shifted = (x - row_max) * inv_tau,
        exp(shifted), the latter's sums over the slice [K, R] in float64).
    hta_kl_slice_histogram(p [R, c], prefix int64 [R], shift, width) -> (counts, masses), int64
        [R, 2**width]: over the classes whose selection key (the bits of p; 0 for NaN, which is
        left out) agrees with `prefix` above bit `shift + width`, how many and how much
        fixed-point mass (floor(p * 2**62)) fall on each value of the digit
        `(key >> shift) & (2**width - 1)`; 1 <= width <= 8 (distributed.py's digits are 8 bits or
        fewer; the CPU kernel takes up to 16), shift + width within the key's bits (key_bits).
    hta_kl_slice_head(p, boundary int64 [R], tied_in_head int64 [R]) -> bool [R, c]: key >
        boundary, plus the first `tied_in_head` non-NaN classes of the slice (ascending index)
        whose key equals it (SPEC 1.3). A boundary of -1 takes every class, 2**63 - 1 none.
    hta_kl_slice_sums(p, log_p, q, log_q [R, c], q_steps, log_q_steps [S, R, c], head)
        -> [R, n]: the slice's row sums (SPEC 1.4-1.6 and the class sums of SPEC 2): the head
        and tail sums of |p - q|, F's and R's terms, the head and tail sums of q s and of p s
        (s = sign(q - p)); with S > 1 softmaxes (prob_mean) then per step the sums of p r_t,
        of q_t (log q - log p + 1), and the head and tail sums of q_t s (r_t = q_t / q from the
        logs, 0 where log q_t = -inf). n = 8, or 8 + 4 S. In a row with a NaN probability the sum of
        the two distances is NaN (so are its loss and gradients); its other sums may differ
        between implementations.
    hta_kl_slice_grads(p, ..., head, totals [R, n], inv_tau, row_scale, detach_weights, steps,
        grad_student, grad_teacher) -> (row_scale * loss_row [R], d student softmaxes' logits
        [S, R, c], d teacher [R, c]; empty tensors where not wanted): SPEC 1.5-1.6 and 2 from
        the row sums of the whole rows (phase 3's, summed over the ranks); a single softmax's
        gradient carries the 1/steps of a logit mean over `steps` steps.

`TorchPhases` implements them with PyTorch tensor ops on any device: the reference backend's
phases, those of every backend without phase ops of its own, and what the kernels' are tested
against (integers exactly, floats to rounding). `KernelPhases` calls the registered ops (the C++
CPU kernel, csrc/cpu/hta_kl_cpu_phases.cpp, sharing csrc/hta_kl_math.h's per-class math).
"""

from __future__ import annotations

import math

import torch

from .._library import HTA_KL_SLICE_SCHEMAS

# Fixed-point scale of the selection's masses: p <= 1 (up to rounding), so a row's total stays
# far below 2**63 even after float32 rounding of every p.
MASS_BITS = 62


def selection_keys(p: torch.Tensor) -> torch.Tensor:
    """int64 keys of p [R, c]: its bit patterns (non-negative floats order like their bits), 0 for
    NaN."""
    integer = torch.int32 if p.dtype == torch.float32 else torch.int64
    return torch.where(p.isnan(), 0, p.view(integer)).to(torch.int64)


def key_bits(dtype: torch.dtype) -> int:
    """The bits a key of a p of `dtype` runs over (below the sign bit)."""
    return 31 if dtype == torch.float32 else 63


def _where_positive(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` where x > 0, else 0 (SPEC 1.6: a term whose leading factor is zero is zero)."""
    return torch.where(x > 0, value, torch.zeros_like(value))


def _ratios(log_q_steps, log_q):
    """q_t / q in [0, T] as a ratio of exponentials, never a division by a tiny q; 0 only where
    log q_t is -inf (an underflowed q_t beside an equally tiny q has a ratio of order 1)."""
    return torch.where(torch.isneginf(log_q_steps), 0.0, torch.exp(log_q_steps - log_q))


class TorchPhases:
    """The phase ops as PyTorch tensor ops (the module docstring's contract)."""

    @staticmethod
    def slice_max(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 0:
            return x.new_full(x.shape[:-1], -math.inf)
        return torch.where(x.isnan(), -math.inf, x).amax(dim=-1)

    @staticmethod
    def slice_exp_sums(x, row_max, inv_tau: float):
        shifted = (x - row_max.unsqueeze(-1)) * inv_tau
        exponentials = torch.exp(shifted)
        return shifted, exponentials, exponentials.sum(dim=-1, dtype=torch.float64)

    @staticmethod
    def slice_histogram(p, prefix, shift: int, width: int):
        keys = selection_keys(p)
        # Only the matching classes are gathered and binned: past the first digit, a few.
        row, column = (((keys >> (shift + width)) == prefix.unsqueeze(1)) & ~p.isnan()).nonzero(
            as_tuple=True)
        slots = (row << width) | ((keys[row, column] >> shift) & ((1 << width) - 1))
        masses = torch.floor(p[row, column].to(torch.float64) * float(2 ** MASS_BITS))
        zeros = keys.new_zeros(p.shape[0] << width)
        return (zeros.index_add(0, slots, torch.ones_like(slots)).view(p.shape[0], 1 << width),
                zeros.index_add(0, slots, masses.to(torch.int64)).view(p.shape[0], 1 << width))

    @staticmethod
    def slice_head(p, boundary, tied_in_head):
        keys = selection_keys(p)
        tied = (keys == boundary.unsqueeze(1)) & ~p.isnan()
        position = tied.to(torch.int64).cumsum(dim=1) - 1  # among the slice's ties of the row
        return (keys > boundary.unsqueeze(1)) | (tied & (position < tied_in_head.unsqueeze(1)))

    @staticmethod
    def slice_sums(p, log_p, q, log_q, q_steps, log_q_steps, head):
        distance = (p - q).abs()
        sign = torch.sign(q - p)
        prob_mean = q_steps.shape[0] > 1
        # Head and tail sums [R, n, 2] of every split term at once. Masked sums, not a batched
        # product with the masks: a float32 matmul may run in TF32 (or bfloat16) where the
        # matmul precision allows it, rounding every term.
        split = torch.stack([distance, q * sign, p * sign, *(q_steps * sign if prob_mean else ())],
                            dim=1)
        in_head = head.unsqueeze(1)
        sides = torch.stack([torch.where(in_head, split, 0.0).sum(-1),
                             torch.where(in_head, 0.0, split).sum(-1)], dim=2)
        sums = [sides[:, 0, 0], sides[:, 0, 1],
                _where_positive(p, p * (log_p - log_q)).sum(-1),
                _where_positive(q, q * (log_q - log_p)).sum(-1),
                sides[:, 1, 0], sides[:, 1, 1], sides[:, 2, 0], sides[:, 2, 1]]
        if prob_mean:
            sums += [(p * _ratios(log_q_steps, log_q)).sum(-1),
                     _where_positive(q_steps, q_steps * (log_q - log_p + 1)).sum(-1),
                     sides[:, 3:, 0].T, sides[:, 3:, 1].T]
        return torch.cat([s.reshape(-1, p.shape[0]) for s in sums]).T.contiguous()

    @staticmethod
    def slice_grads(p, log_p, q, log_q, q_steps, log_q_steps, head, totals, inv_tau: float,
                    row_scale: float, detach_weights: bool, steps: int, grad_student: bool,
                    grad_teacher: bool):
        totals = totals.T
        d_head, d_tail, fkl, rkl, q_head, q_tail, p_head, p_tail = totals[:8]
        # SPEC 1.5-1.6
        total = d_head + d_tail
        vanished = total == 0
        safe_total = torch.where(vanished, 1.0, total)
        lam_h = torch.where(vanished, 0.5, d_head / safe_total)
        lam_t = torch.where(vanished, 0.5, d_tail / safe_total)
        loss_rows = row_scale * (lam_h * fkl + lam_t * rkl)
        empty = p.new_empty(0)
        if not (grad_student or grad_teacher):
            return loss_rows, empty, empty
        # SPEC 2, with d_tail / Sg^2 formed as lam_t / Sg (Sg^2 may underflow)
        if detach_weights:
            dl_head = dl_tail = torch.zeros_like(total)
        else:
            dl_head = torch.where(vanished, 0.0, lam_t / safe_total)
            dl_tail = torch.where(vanished, 0.0, -lam_h / safe_total)
        column = lambda row_values: row_values.unsqueeze(-1)  # noqa: E731  [R] -> [R, 1]
        sign = torch.sign(q - p)
        dl = sign * torch.where(head, column(dl_head), column(dl_tail))
        scale = row_scale * inv_tau
        gap = column(fkl - rkl)
        lam_h_, lam_t_, fkl_, rkl_ = column(lam_h), column(lam_t), column(fkl), column(rkl)
        d_teacher = empty
        if grad_teacher:
            sum_p_dl = column(dl_head * p_head + dl_tail * p_tail)
            d_teacher = scale * (lam_h_ * _where_positive(p, p * (log_p - log_q - fkl_))
                                 + lam_t_ * (p - q) - gap * p * (dl - sum_p_dl))
        d_student = empty
        if grad_student and q_steps.shape[0] > 1:
            step_sums = totals[8:].reshape(4, q_steps.shape[0], -1)
            g_sum = (-lam_h * step_sums[0] + lam_t * step_sums[1]
                     + (fkl - rkl) * (dl_head * step_sums[2] + dl_tail * step_sums[3]))
            q_t_g = (-lam_h_ * p * _ratios(log_q_steps, log_q)
                     + lam_t_ * _where_positive(q_steps, q_steps * (log_q - log_p + 1))
                     + gap * q_steps * dl)
            d_student = (scale / steps) * (q_t_g - q_steps * g_sum.unsqueeze(-1))
        elif grad_student:
            sum_q_dl = column(dl_head * q_head + dl_tail * q_tail)
            d_student = (scale / steps) * (lam_h_ * (q - p)
                                           + lam_t_ * _where_positive(q, q * (log_q - log_p - rkl_))
                                           + gap * q * (dl - sum_q_dl))
            d_student = d_student.unsqueeze(0)
        return loss_rows, d_student, d_teacher


def _registered(name: str):
    """A phase of KernelPhases: the op `htakl::hta_kl_<name>`, looked up when called (the
    compiled kernel registers it when it loads)."""
    return staticmethod(lambda *args: getattr(torch.ops.htakl, f"hta_kl_{name}")(*args))


class KernelPhases:
    """The phase ops registered by a compiled kernel (the dispatcher picks it by device)."""

    slice_max = _registered("slice_max")
    slice_exp_sums = _registered("slice_exp_sums")
    slice_histogram = _registered("slice_histogram")
    slice_head = _registered("slice_head")
    slice_sums = _registered("slice_sums")
    slice_grads = _registered("slice_grads")


# Fake implementations (shapes and dtypes only), so that the ops trace under torch.compile and
# pass torch.library.opcheck.
def _fake_max(x):
    return x.new_empty(x.shape[:-1])


def _fake_exp_sums(x, row_max, inv_tau):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float64)


def _fake_histogram(p, prefix, shift, width):
    return prefix.new_empty(p.shape[0], 1 << width), prefix.new_empty(p.shape[0], 1 << width)


def _fake_head(p, boundary, tied_in_head):
    return torch.empty(p.shape, dtype=torch.bool, device=p.device)


def _fake_sums(p, log_p, q, log_q, q_steps, log_q_steps, head):
    softmaxes = q_steps.shape[0]
    return p.new_empty(p.shape[0], 8 + (4 * softmaxes if softmaxes > 1 else 0))


def _fake_grads(p, log_p, q, log_q, q_steps, log_q_steps, head, totals, inv_tau, row_scale,
                detach_weights, steps, grad_student, grad_teacher):
    return (p.new_empty(p.shape[0]),
            torch.empty_like(q_steps) if grad_student else p.new_empty(0),
            torch.empty_like(p) if grad_teacher else p.new_empty(0))


_FAKES = dict(zip(HTA_KL_SLICE_SCHEMAS, (_fake_max, _fake_exp_sums, _fake_histogram, _fake_head,
                                         _fake_sums, _fake_grads)))
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"htakl::{_name}", _fake)
