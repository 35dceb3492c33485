"""Vocab-parallel HTA-KL (htakl_kernels.distributed) on spawned gloo process groups.

Every rank builds the same whole rows, passes its contiguous slice of the classes to the
vocab-parallel call, and compares the result with the single-device call on the whole rows (CPU
kernel for the loss and gradients, the reference's head_mask for the membership). Many cases run
inside one process group; every group has a hard timeout, so a hang fails the test quickly.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import htakl_kernels as hk
from htakl_kernels import distributed as hkd
from htakl_kernels._backends import unavailable_reason
from htakl_kernels.reference.hta_kl import head_mask

from hta_kl_oracle import draw_teacher

GROUP_TIMEOUT_S = 240
TEMPERATURE = 2.0
# The local phases: the CPU kernel's phase ops, and the PyTorch-op phases of the reference.
BACKENDS = ("cpu", "reference")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker, result_folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        failures = worker(rank, world)
    except Exception:  # reported by the parent with the rank's traceback
        failures = [traceback.format_exc()]
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_folder, f"rank{rank}.txt"), "w") as out:
        out.write("\n".join(failures))


def run_group(world: int, worker, tmp_path) -> None:
    """Run worker(rank, world) -> list of failures on `world` spawned gloo ranks; fail the test
    with every rank's failures, or when the group does not finish within GROUP_TIMEOUT_S."""
    context = mp.start_processes(_entry, args=(world, _free_port(), worker, str(tmp_path)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the group of {world} ranks did not finish within {GROUP_TIMEOUT_S} s")
    failures = []
    for rank in range(world):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        if text:
            failures.append(f"rank {rank}:\n{text}")
    assert not failures, "\n".join(failures)


def _bounds(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _splits(classes: int, world: int, generator) -> list[list[int]]:
    """Uneven splits of `classes` over `world` ranks, one with an empty rank and an even one."""
    even = [classes // world + (rank < classes % world) for rank in range(world)]
    cuts = sorted(torch.randint(0, classes + 1, (world - 1,), generator=generator).tolist())
    uneven = [b - a for a, b in zip([0, *cuts], [*cuts, classes])]
    empty_first = [0, *([classes // (world - 1)] * (world - 2)),
                   classes - (classes // (world - 1)) * (world - 2)]
    return [even, uneven, empty_first]


TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=2e-5, atol=1e-6)}
GRAD_TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-15),
                   torch.float32: dict(rtol=2e-4, atol=1e-6)}


def _compare(student, teacher, sizes, rank, options, failures, what, device="cpu"):
    """One case: the rank's slices (on `device`) through the vocab-parallel call against the CPU
    kernel on the whole rows (loss, gradients of the rank's slices under an incoming gradient
    other than 1, the same loss bits on every rank)."""
    start, stop = _bounds(sizes, rank)
    local_student = student[..., start:stop].to(device).clone().requires_grad_(True)
    local_teacher = teacher[..., start:stop].to(device).clone().requires_grad_(True)
    loss = hk.hta_kl_div(local_student, local_teacher, group=dist.group.WORLD, **options)
    # the same on every rank: the loss of the whole rows, each row weighted differently
    upstream = 0.5 + torch.rand(loss.shape, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64)
    (loss * upstream.to(loss.dtype).to(device)).sum().backward()
    loss = loss.cpu()
    whole_student = student.clone().requires_grad_(True)
    whole_teacher = teacher.clone().requires_grad_(True)
    expected = hk.hta_kl_div(whole_student, whole_teacher, **dict(options, backend="cpu"))
    (expected * upstream.to(expected.dtype)).sum().backward()
    dtype = student.dtype
    try:
        torch.testing.assert_close(loss, expected, equal_nan=True, **TOLERANCES[dtype])
        torch.testing.assert_close(local_student.grad.cpu(), whole_student.grad[..., start:stop],
                                   equal_nan=True, **GRAD_TOLERANCES[dtype])
        torch.testing.assert_close(local_teacher.grad.cpu(), whole_teacher.grad[..., start:stop],
                                   equal_nan=True, **GRAD_TOLERANCES[dtype])
        losses = [torch.empty_like(loss) for _ in range(dist.get_world_size())]
        dist.all_gather(losses, loss.detach())
        assert all(torch.equal(other.nan_to_num(), loss.detach().nan_to_num()) for other in losses), \
            "ranks got different losses"
    except AssertionError as error:
        failures.append(f"{what} sizes={sizes} {options}: {error}")


def _compare_head(teacher, sizes, rank, delta, failures, what, backend="auto"):
    start, stop = _bounds(sizes, rank)
    got = hkd.vocab_parallel_head_mask(teacher[..., start:stop], temperature=TEMPERATURE,
                                       delta=delta, group=dist.group.WORLD, backend=backend)
    want = head_mask(torch.softmax(teacher.double() / TEMPERATURE, -1), delta)[..., start:stop]
    finite = ~teacher.isnan().any(-1)
    if not torch.equal(got[finite], want[finite]):
        failures.append(f"{what} sizes={sizes} delta={delta}: head membership differs")


def _random_cases(rank, world, device="cpu"):
    """Random rows clear of the head boundary: every dtype, student kind, reduction and
    detach_weights, over three splits."""
    failures = []
    backends = BACKENDS if device == "cpu" else ("cuda", "reference")
    generator = torch.Generator().manual_seed(1234 + world)
    rows, classes, delta = 5, 23, 0.6
    for dtype in (torch.float64, torch.float32):
        teacher = draw_teacher(rows, classes, temperature=TEMPERATURE, delta=delta, dtype=dtype,
                               scale=3.0, generator=generator)
        students = {
            "2-D": torch.randn(rows, classes, generator=generator, dtype=torch.float64).to(dtype) * 3,
            "T=1": torch.randn(1, rows, classes, generator=generator, dtype=torch.float64).to(dtype) * 3,
            "T=4": torch.randn(4, rows, classes, generator=generator, dtype=torch.float64).to(dtype) * 3,
        }
        splits = _splits(classes, world, generator)
        for sizes, backend in zip(splits, itertools.cycle(backends)):
            _compare_head(teacher, sizes, rank, delta, failures, f"{dtype} {backend}", backend)
        # Every combination once, the splits taking turns.
        combinations = [
            (kind, time_reduction, reduction, detach)
            for kind, time_reduction, reduction, detach in itertools.product(
                students, ("prob_mean", "logit_mean"), ("batchmean", "sum", "none"), (False, True))
            if not (kind == "2-D" and time_reduction == "logit_mean")
        ]
        for index, (kind, time_reduction, reduction, detach) in enumerate(combinations):
            options = dict(temperature=TEMPERATURE, delta=delta, time_reduction=time_reduction,
                           reduction=reduction, detach_weights=detach,
                           backend=backends[index % len(backends)])
            _compare(students[kind], teacher, splits[index % len(splits)], rank, options, failures,
                     f"{dtype} {kind}", device)
    return failures


def _special_cases(rank, world):
    """Ties across a slice boundary, all-equal rows, -inf classes and NaN rows."""
    failures = []
    generator = torch.Generator().manual_seed(99)
    classes = 4 * world + 3
    for dtype in (torch.float64, torch.float32):
        # Ties: one top class and eight tied ones spread over every slice, then the rest lower.
        # delta sits between the 2nd and 3rd tied class, clear of both.
        ties = torch.full((classes,), -4.0, dtype=torch.float64)
        ties[0] = 3.0
        ties[1:9] = 1.0
        p = torch.softmax(ties / TEMPERATURE, -1)
        delta = float(p[0] + 2.5 * p[1])
        tie_rows = torch.stack([ties[torch.randperm(classes, generator=generator)] for _ in range(4)])
        tie_rows = tie_rows.to(dtype)
        # All-equal rows: 1/C each; delta = 0.5 between k/C values.
        equal_rows = torch.zeros(2, classes, dtype=dtype)
        student = 3 * torch.randn(2, 4, classes, generator=generator, dtype=torch.float64).to(dtype)
        sizes_list = _splits(classes, world, generator)
        for sizes, backend in itertools.product(sizes_list, BACKENDS):
            _compare_head(tie_rows, sizes, rank, delta, failures, f"{dtype} ties {backend}",
                          backend)
            _compare_head(equal_rows, sizes, rank, 0.5, failures, f"{dtype} all-equal {backend}",
                          backend)
        for index, (reduction, detach, time_reduction) in enumerate(itertools.product(
                ("none", "batchmean"), (False, True), ("prob_mean", "logit_mean"))):
            sizes = sizes_list[index % len(sizes_list)]
            options = dict(temperature=TEMPERATURE, delta=delta, reduction=reduction,
                           detach_weights=detach, time_reduction=time_reduction,
                           backend=BACKENDS[index % len(BACKENDS)])
            _compare(student, tie_rows, sizes, rank, options, failures, f"{dtype} ties")
            _compare(student[:, :2], equal_rows, sizes, rank, dict(options, delta=0.5),
                     failures, f"{dtype} all-equal")
        # Non-finite: a class masked (-inf) in teacher and student, one in the teacher only, one
        # in the student only, a NaN in the teacher, a NaN in one student step.
        teacher = torch.randn(5, classes, generator=generator, dtype=torch.float64).to(dtype)
        student = torch.randn(3, 5, classes, generator=generator, dtype=torch.float64).to(dtype)
        teacher[0, 1] = student[:, 0, 1] = -math.inf
        teacher[0, classes - 1] = student[:, 0, classes - 1] = -math.inf
        teacher[1, 2] = -math.inf
        student[:, 2, 3] = -math.inf
        teacher[3, classes // 2] = math.nan
        student[1, 4, 0] = math.nan
        for index, (reduction, detach) in enumerate(itertools.product(("none", "sum"), (False, True))):
            sizes = sizes_list[index % len(sizes_list)]
            options = dict(temperature=TEMPERATURE, delta=0.5, reduction=reduction,
                           detach_weights=detach, backend=BACKENDS[index % len(BACKENDS)])
            _compare(student, teacher, sizes, rank, options, failures, f"{dtype} non-finite")
            _compare(student[0], teacher, sizes, rank, options, failures, f"{dtype} non-finite 2-D")
    return failures


def _matching_worker(rank, world):
    return _random_cases(rank, world) + _special_cases(rank, world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_single_device(world, tmp_path):
    run_group(world, _matching_worker, tmp_path)


def _cuda_worker(rank, world):
    return _random_cases(rank, world, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_through_gloo(tmp_path):
    """CUDA tensors on gloo ranks (their statistics cross through the CPU), against the CPU
    kernel on the whole rows; two ranks share one GPU."""
    run_group(2, _cuda_worker, tmp_path)


def test_head_mask_without_a_group():
    """group=None: the reference's membership, after the same argument checks as on a group."""
    teacher = torch.randn(3, 11, generator=torch.Generator().manual_seed(3))
    got = hkd.vocab_parallel_head_mask(teacher, temperature=TEMPERATURE, delta=0.4, group=None)
    assert torch.equal(got, head_mask(torch.softmax(teacher / TEMPERATURE, -1), 0.4))
    with pytest.raises(ValueError, match="delta"):
        hkd.vocab_parallel_head_mask(teacher, temperature=TEMPERATURE, delta=1.5, group=None)
    with pytest.raises(ValueError, match="backend"):
        hkd.vocab_parallel_head_mask(teacher, temperature=TEMPERATURE, delta=0.4, group=None,
                                     backend="gpu")


def _expect_error(failures, what, call, kind, fragment):
    try:
        call()
    except kind as error:
        if fragment not in str(error):
            failures.append(f"{what}: error {error!r} does not mention {fragment!r}")
    except Exception as error:  # noqa: BLE001  reported as a failure of this case
        failures.append(f"{what}: raised {error!r}, expected {kind.__name__}")
    else:
        failures.append(f"{what}: no error")


def _expect_error_from(failures, what, rank, bad_rank, bad_call, good_call, kind, fragment):
    """`bad_rank` passes bad arguments (its own error, `kind` naming `fragment`), the others good
    ones: they raise a ValueError naming the bad rank."""
    if rank == bad_rank:
        _expect_error(failures, what, bad_call, kind, fragment)
    else:
        _expect_error(failures, what, good_call, ValueError, f"rank {bad_rank}")


def _selection_rounds(dtype):
    return 4 if dtype != torch.float64 else 8


def _expected_traffic(dtype, rows, softmaxes, step_sums):
    """The module docstring's table: (collectives, bytes this rank passes in)."""
    b = 8 if dtype == torch.float64 else 4
    rounds = _selection_rounds(dtype)
    histogram_bytes = ((rounds - 1) * 256 + 128) * 8
    collectives = 1 + 2 + rounds + 1 + 1
    passed = 13 * 8 + rows * ((1 + softmaxes) * (b + 8) + histogram_bytes + 8 + (8 + 4 * step_sums) * b)
    return collectives, passed


def _api_worker(rank, world):
    failures = []
    world_group = dist.group.WORLD
    generator = torch.Generator().manual_seed(7)
    rows, classes = 6, 13
    sizes = [5, 0, 8]
    start, stop = _bounds(sizes, rank)
    teacher = torch.randn(rows, classes, generator=generator)
    student = torch.randn(4, rows, classes, generator=generator)
    # Collectives and bytes, as the module docstring states them.
    for dtype, local_student, softmaxes, step_sums in (
            (torch.float32, student[0], 1, 0), (torch.float64, student, 4, 4),
            (torch.float32, student, 1, 0)):
        with hkd.Traffic() as traffic:
            options = dict(time_reduction="logit_mean") if softmaxes == 1 and local_student.dim() == 3 else {}
            hk.hta_kl_div(local_student[..., start:stop].to(dtype), teacher[:, start:stop].to(dtype),
                          group=world_group, **options)
        expected = _expected_traffic(dtype, rows, softmaxes, step_sums)
        if (traffic.collectives, traffic.bytes) != expected:
            failures.append(f"traffic {dtype} {tuple(local_student.shape)}: "
                            f"{(traffic.collectives, traffic.bytes)} != {expected}")
    # Bad input raises on every rank, and the group stays usable afterwards.
    local_teacher, local_student = teacher[:, start:stop], student[:, :, start:stop]

    def call(**changes):
        arguments = dict(student=local_student, teacher=local_teacher, group=world_group)
        arguments.update(changes)
        return lambda: hk.hta_kl_div(**arguments)

    _expect_error(failures, "row counts", call(
        teacher=torch.randn(rows + 1, stop - start), student=torch.randn(4, rows + 1, stop - start))
        if rank == 1 else call(), ValueError, "rows")
    _expect_error(failures, "delta", call(delta=0.7 if rank == 2 else 0.5), ValueError, "delta")
    _expect_error_from(failures, "integer teacher", rank, 1, call(teacher=local_teacher.long()),
                       call(), TypeError, "teacher")
    _expect_error(failures, "no class anywhere", call(
        teacher=teacher[:, :0], student=student[..., :0]), ValueError, "at least one class")
    _expect_error(failures, "student slice", call(student=student[..., :stop - start + 1]),
                  ValueError, "C=")
    # The vocab-parallel cross-entropy: arguments bad on one rank, or an ignore_index that
    # differs, raise on every rank (a rank raising alone would leave the others waiting).
    labels = torch.randint(0, classes, (rows,), generator=generator)
    local_logits = teacher[:, start:stop]

    def cross_entropy(logits=local_logits, labels=labels, **options):
        return lambda: hkd.vocab_parallel_cross_entropy(logits, labels, group=world_group,
                                                        **options)

    _expect_error_from(failures, "integer logits", rank, 1,
                       cross_entropy(logits=local_logits.long()), cross_entropy(), TypeError,
                       "logits")
    _expect_error_from(failures, "float labels", rank, 0, cross_entropy(labels=labels.double()),
                       cross_entropy(), TypeError, "labels")
    _expect_error(failures, "ignore_index differing", cross_entropy(
        ignore_index=int(labels[0]) if rank == 2 else -100), ValueError, "ignore_index")
    # 16-bit inputs: computed in float32, loss and gradients in the inputs' dtype.
    half_student = student[..., start:stop].bfloat16().requires_grad_(True)
    half_loss = hk.hta_kl_div(half_student, teacher[:, start:stop].bfloat16(), group=world_group)
    half_loss.backward()
    whole_half = student.bfloat16().requires_grad_(True)
    expected_half = hk.hta_kl_div(whole_half, teacher.bfloat16(), backend="cpu")
    expected_half.backward()
    if half_loss.dtype != torch.bfloat16 or half_student.grad.dtype != torch.bfloat16:
        failures.append("bfloat16 inputs: loss or gradient not in bfloat16")
    torch.testing.assert_close(half_loss, expected_half, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(half_student.grad, whole_half.grad[..., start:stop], rtol=2e-2,
                               atol=2e-3)
    # Triton's phase kernels (its interpreter on CPU tensors), where Triton is there.
    if unavailable_reason("triton", "cpu") is None:
        for dtype in (torch.float64, torch.float32):
            _compare(student.to(dtype), teacher.to(dtype), sizes, rank,
                     dict(backend="triton", reduction="none"), failures, f"triton {dtype}")
    after = hk.hta_kl_div(local_student, local_teacher, group=world_group)
    torch.testing.assert_close(after, hk.hta_kl_div(student, teacher), rtol=2e-5, atol=1e-6)
    # A group of one rank is the single-device call.
    single = dist.new_group([0])
    if rank == 0:
        if not torch.equal(hk.hta_kl_div(student, teacher, group=single),
                           hk.hta_kl_div(student, teacher)):
            failures.append("a one-rank group differs from the single-device call")
    # The loss modules: HTAKLLoss and SpikingKDLoss (with the vocab-parallel cross-entropy).
    labels = torch.randint(0, classes, (rows,), generator=generator)
    labels[2] = -100
    for reduction in ("batchmean", "sum", "none"):
        modules = [
            (hk.HTAKLLoss(reduction=reduction, group=world_group), hk.HTAKLLoss(reduction=reduction), ()),
            (hk.SpikingKDLoss(alpha=0.3, reduction=reduction, group=world_group),
             hk.SpikingKDLoss(alpha=0.3, reduction=reduction), (labels,)),
        ]
        for parallel, single_device, extra in modules:
            local = student[..., start:stop].double().requires_grad_(True)
            whole = student.double().requires_grad_(True)
            got = parallel(local, teacher[:, start:stop].double(), *extra)
            want = single_device(whole, teacher.double(), *extra)
            got.sum().backward()
            want.sum().backward()
            try:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
                torch.testing.assert_close(local.grad, whole.grad[..., start:stop], rtol=1e-10,
                                           atol=1e-15)
            except AssertionError as error:
                failures.append(f"{type(parallel).__name__} {reduction}: {error}")
    return failures


def test_api_errors_and_traffic(tmp_path):
    run_group(3, _api_worker, tmp_path)


def _fused_linear_case(rank, sizes, dtype, failures, what, *, steps=None, labels=None,
                       row_mask=None, upstream=None, frozen_teacher=False, **options):
    """One fused-linear case: this rank's rows of the heads' weights and biases through the
    vocab-parallel call against the single-process call on the whole heads (CPU kernel): the
    loss, the weight and bias gradients of the rank's slice, the whole input gradients."""
    generator = torch.Generator().manual_seed(sum(sizes) * 31 + (steps or 0))
    rows, student_hidden, teacher_hidden = 6, 7, 5
    classes = sum(sizes)
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    student_input = draw(*(() if steps is None else (steps,)), rows, student_hidden)
    whole = dict(student_input=student_input, student_weight=draw(classes, student_hidden) * 2,
                 student_bias=draw(classes), teacher_input=draw(rows, teacher_hidden),
                 teacher_weight=draw(classes, teacher_hidden) * 2, teacher_bias=draw(classes))
    start, stop = _bounds(sizes, rank)
    local = {name: (tensor if name.endswith("input") else tensor[start:stop]).clone()
             for name, tensor in whole.items()}
    whole = {name: tensor.clone() for name, tensor in whole.items()}
    trained = [name for name in whole if not (frozen_teacher and name.startswith("teacher"))]
    for tensors in (local, whole):
        for name in trained:
            tensors[name].requires_grad_(True)
    extra = dict(row_mask=row_mask, **options)
    extra_options = dict(backend=extra.pop("backend", "auto"))
    if labels is None:
        call = hk.fused_linear_hta_kl_div
    else:
        def call(*args, **kwargs):
            return hk.fused_linear_spiking_kd_loss(*args[:4], labels, **kwargs)

    def run(tensors, **more):
        loss = call(tensors["student_input"], tensors["student_weight"], tensors["teacher_input"],
                    tensors["teacher_weight"], student_bias=tensors["student_bias"],
                    teacher_bias=tensors["teacher_bias"], **extra, **more)
        (loss * (1.0 if upstream is None else upstream.to(dtype))).sum().backward()
        return loss.detach()

    got = run(local, group=dist.group.WORLD, **extra_options)
    expected = run(whole, **dict(extra_options, backend="cpu"))
    grad_tolerance = dict(GRAD_TOLERANCES[dtype], atol=1e-13 if dtype == torch.float64 else 1e-6)
    try:
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
        for name in trained:
            want = whole[name].grad if name.endswith("input") else whole[name].grad[start:stop]
            torch.testing.assert_close(local[name].grad, want, **grad_tolerance,
                                       msg=lambda message, name=name: f"{name}: {message}")
        losses = [torch.empty_like(got) for _ in range(dist.get_world_size())]
        dist.all_gather(losses, got)
        assert all(torch.equal(other, got) for other in losses), "ranks got different losses"
    except AssertionError as error:
        failures.append(f"fused linear {what} {dtype} sizes={sizes} {options}: {error}")


def _fused_linear_worker(rank, world):
    failures = []
    generator = torch.Generator().manual_seed(5)
    row_mask = torch.tensor([True, False, True, True, False, True])
    labels = torch.randint(0, 13, (6,), generator=generator)
    labels[1] = -100  # a masked row's label is never read
    upstream = torch.rand(6, generator=generator, dtype=torch.float64)
    splits = ([5, 0, 8], [1, 9, 3])  # a rank with no class; uneven slices
    cases = [
        (splits[0], torch.float64, "2-D", dict(reduction="batchmean", chunk_rows=4)),
        (splits[1], torch.float64, "2-D", dict(reduction="sum", detach_weights=True,
                                               backend="reference")),
        (splits[0], torch.float64, "T=3", dict(steps=3, reduction="none", chunk_rows=2,
                                               upstream=upstream)),
        (splits[1], torch.float64, "T=3 logit_mean",
         dict(steps=3, time_reduction="logit_mean", row_mask=row_mask, chunk_rows=3)),
        (splits[0], torch.float64, "spiking KD", dict(steps=2, labels=labels, alpha=0.3,
                                                      row_mask=row_mask, chunk_rows=2)),
        (splits[1], torch.float64, "spiking KD none",
         dict(labels=labels.clamp(min=0), alpha=0.6, reduction="none", upstream=upstream)),
        (splits[1], torch.float32, "T=3", dict(steps=3, chunk_rows=4)),
        # A frozen teacher: only the student's input gradient is summed over the ranks.
        (splits[0], torch.float64, "frozen teacher", dict(steps=2, labels=labels.clamp(min=0),
                                                          alpha=0.4, frozen_teacher=True)),
    ]
    for sizes, dtype, what, options in cases:
        _fused_linear_case(rank, sizes, dtype, failures, what, **options)
    # The module form, and options that differ between ranks: an error on every rank.
    start, stop = _bounds(splits[0], rank)
    whole_weight = torch.randn(13, 4, generator=generator)
    weight = whole_weight[start:stop]
    features = torch.randn(6, 4, generator=generator)
    counted_labels = labels.clamp(min=0)
    got = hk.FusedLinearSpikingKDLoss(alpha=0.5, group=dist.group.WORLD)(
        features, weight, features, weight, counted_labels)
    want = hk.FusedLinearSpikingKDLoss(alpha=0.5)(features, whole_weight, features, whole_weight,
                                                  counted_labels)
    try:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    except AssertionError as error:
        failures.append(f"FusedLinearSpikingKDLoss: {error}")
    _expect_error(failures, "chunk_rows differing", lambda: hk.fused_linear_hta_kl_div(
        features, weight, features, weight, chunk_rows=2 + (rank == 2), group=dist.group.WORLD),
        ValueError, "chunk_rows")
    _expect_error(failures, "labels out of range", lambda: hk.fused_linear_spiking_kd_loss(
        features, weight, features, weight, torch.full((6,), 13), group=dist.group.WORLD),
        ValueError, "[0, 13)")
    return failures


def test_fused_linear_matches_single_device(tmp_path):
    run_group(3, _fused_linear_worker, tmp_path)
