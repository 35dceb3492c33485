"""Small cases through the CUDA HTA-KL and LIF ops, for compute-sanitizer on a GPU machine.

    compute-sanitizer --tool memcheck  .venv/bin/python tests/cuda/sanitizer_case.py
    compute-sanitizer --tool racecheck .venv/bin/python tests/cuda/sanitizer_case.py
    compute-sanitizer --tool synccheck .venv/bin/python tests/cuda/sanitizer_case.py

Covers every code path of the kernel on little data: each dtype; 2-D, prob_mean (one and two
groups of per-step sums) and logit_mean students; rows kept in shared memory and rows re-read from
global memory; unaligned rows (odd C); a tie split inside the boundary group (the ordered tie
search) and a uniform teacher; an empty head. Exits non-zero if the op raises or a result is not
finite where it must be (the tests in tests/test_hta_kl_cuda.py check the values).

The LIF kernels run forward and backward in every dtype with 16-byte-aligned rows (the vector
kernels) and odd neuron counts (one neuron per thread), sequences within one backward segment and
longer ones (checkpoints), and every returned membrane.
"""

from __future__ import annotations

import sys

import torch

import htakl_kernels
from htakl_kernels._backends import extension_built_with_cuda


def run(steps: int, rows: int, classes: int, dtype: torch.dtype, *, logit_mean: bool = False,
        delta: float = 0.5, teacher: torch.Tensor | None = None) -> None:
    generator = torch.Generator(device="cuda").manual_seed(classes + steps)
    if teacher is None:
        teacher = torch.randn(rows, classes, generator=generator, device="cuda") * 4
    student = torch.randn(steps, rows, classes, generator=generator, device="cuda") * 4
    loss, d_student, d_teacher = torch.ops.htakl.hta_kl_fused(
        student.to(dtype), teacher.to(dtype), 2.0, delta, logit_mean, False, True, True)
    torch.cuda.synchronize()
    for name, value in (("loss", loss), ("d student", d_student), ("d teacher", d_teacher)):
        if not torch.isfinite(value).all():
            raise AssertionError(f"{name} not finite: T={steps} R={rows} C={classes} {dtype}")


def run_lif(steps: int, neurons: int, dtype: torch.dtype, return_v: str | None) -> None:
    generator = torch.Generator(device="cuda").manual_seed(steps * neurons)
    x = (1.0 + torch.randn(steps, neurons, generator=generator, device="cuda")).to(dtype)
    v_init = torch.rand(neurons, generator=generator, device="cuda").to(dtype).requires_grad_(True)
    x.requires_grad_(True)
    out = htakl_kernels.lif_multistep(x, v_init=v_init, return_v=return_v, backend="cuda")
    outputs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outputs, [torch.randn_like(o) for o in outputs])
    torch.cuda.synchronize()
    for name, value in (("x grad", x.grad), ("v_init grad", v_init.grad)):
        if not torch.isfinite(value).all():
            raise AssertionError(f"LIF {name} not finite: T={steps} N={neurons} {dtype}")


def main() -> int:
    if not (torch.cuda.is_available() and extension_built_with_cuda()):
        print("needs a CUDA device and htakl_kernels._C built with CUDA", file=sys.stderr)
        return 1
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        run(1, 3, 1000, dtype)                    # 2-D, row in shared memory
        run(3, 2, 1025, dtype)                    # prob_mean, one group, odd C (unaligned rows)
        run(6, 2, 257, dtype)                     # prob_mean, two groups
        run(3, 2, 300, dtype, logit_mean=True)    # logit_mean
        run(1, 1, 3, dtype)                       # fewer classes than one warp's chunks
    # prob_mean, two groups, T short of whole groups, several warps (the second group's vector
    # read of the per-step values must stay off the first group's G_t, see step_slots).
    run(5, 2, 1500, torch.float32)
    # Rows beyond shared memory (4 x 7500 doubles = 240 kB > 227 kB): every pass reads global memory.
    run(3, 1, 7500, torch.float64)
    # Ties: integer logits, delta in the middle of a tie group; then a uniform teacher.
    tied = torch.randint(0, 3, (2, 2000), device="cuda").float()
    p = torch.softmax(tied[0].double() / 2.0, dim=-1)
    sorted_p = torch.sort(p, descending=True).values
    top_count = int((sorted_p == sorted_p[0]).sum())
    run(1, 2, 2000, torch.float32, teacher=tied[[0, 0]],
        delta=float(sorted_p[0]) * (top_count // 2 + 0.5))
    run(2, 2, 777, torch.float32, teacher=torch.zeros(2, 777, device="cuda"), delta=100.5 / 777)
    peaked = torch.randn(2, 500, device="cuda")
    peaked[:, 3] = 50.0
    run(1, 2, 500, torch.float32, teacher=peaked)  # empty head
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for steps, return_v in ((3, None), (8, "last"), (37, "seq")):  # one segment, checkpoints
            run_lif(steps, 4096, dtype, return_v)   # aligned rows: the vector kernels
            run_lif(steps, 1001, dtype, return_v)   # odd N: one neuron per thread
    print("sanitizer cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
