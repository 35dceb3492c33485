"""Training, evaluation, checkpoints and the three student objectives.

Every run (the teacher, each student) checkpoints after each epoch: weights, optimiser,
schedule, history, and finally its measured result. A run restarted on its checkpoint continues
where it stopped and ends exactly as an uninterrupted run would: the data order of epoch `e`
is drawn from a generator seeded with `(seed, e)`, not from a global random state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import htakl_kernels

from .data import Dataset
from .energy import ActivityMonitor
from .models import Network
from .parallel import DataParallel

METHODS = ("ce", "kl", "htakl")
METHOD_TITLES = {"ce": "CE only", "kl": "CE + KL", "htakl": "CE + HTA-KL"}
TEACHER_TITLE = "ANN teacher"

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    progress: bool = True


def _time_mean(logits: torch.Tensor) -> torch.Tensor:
    """A spiking student's `[T, B, K]` logits averaged over time; an ANN's `[B, K]` unchanged."""
    return logits.mean(dim=0) if logits.dim() == 3 else logits


def make_objective(method: str, *, alpha: float, temperature: float, delta: float,
                   backend: str) -> Objective:
    """`objective(logits, teacher_logits, labels)` for one of METHODS.

    - "ce": cross-entropy of the time-averaged logits.
    - "kl": `(1 - alpha) CE + alpha KL(p || q)`, p = softmax(teacher / temperature), q the
      softmax of the time-averaged student logits over temperature (the usual SNN distillation),
      averaged over the batch. No temperature^2 factor, so that it weighs the same as
      the HTA-KL objective below.
    - "htakl": `htakl_kernels.SpikingKDLoss` (SPEC 1.7) on the per-step logits, i.e.
      `(1 - alpha) CE + alpha HTA-KL` with the per-step probabilities averaged (prob_mean).
    """
    if method == "ce":
        return lambda logits, _teacher, labels: F.cross_entropy(_time_mean(logits), labels)
    if method == "kl":
        def kl_objective(logits, teacher, labels):
            mean_logits = _time_mean(logits)
            distill = F.kl_div(
                F.log_softmax(mean_logits / temperature, dim=-1),
                F.log_softmax(teacher / temperature, dim=-1),
                reduction="batchmean", log_target=True,
            )
            return (1 - alpha) * F.cross_entropy(mean_logits, labels) + alpha * distill
        return kl_objective
    if method == "htakl":
        return htakl_kernels.SpikingKDLoss(
            alpha=alpha, temperature=temperature, delta=delta, backend=backend
        )
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def titled_runs(results: dict) -> dict[str, dict]:
    """The teacher's and the students' results, by display title, from a record with "teacher"
    and "students": one seed's in results.json, or their summary."""
    return {TEACHER_TITLE: results["teacher"]} | {
        METHOD_TITLES[method]: run for method, run in results["students"].items()
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model: Network, images: torch.Tensor, replica: torch.nn.Module | None = None) -> torch.Tensor:
    """A forward from a fresh state: spiking neurons keep their membranes until reset.
    `replica` (the DistributedDataParallel wrapper of `model` under torchrun) runs it when given,
    so that the backward averages the gradients over the processes."""
    if model.spiking:
        htakl_kernels.reset_net(model)
    return (replica or model)(images)


@torch.no_grad()
def predict(model: Network, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Time-averaged logits `[N, K]` in evaluation mode."""
    model.eval()
    return torch.cat([
        _time_mean(forward(model, images[start:start + batch_size]))
        for start in range(0, len(images), batch_size)
    ])


def accuracy(model: Network, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    return (predict(model, images, batch_size).argmax(dim=-1) == labels).float().mean().item()


def measure(model: Network, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict:
    """Test accuracy, firing rates and energy (energy.py) of one pass over the test set."""
    with ActivityMonitor(model) as monitor:
        test_accuracy = accuracy(model, images, labels, batch_size)
    return {"test_accuracy": test_accuracy, **monitor.summary()}


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically, so that an interrupted save leaves the previous checkpoint intact."""
    partial = path + ".partial"
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str, device: torch.device) -> dict | None:
    return torch.load(path, map_location=device, weights_only=False) if os.path.exists(path) else None


def train_run(
    name: str,
    model: Network,
    data: Dataset,
    objective: Objective,
    teacher_logits: torch.Tensor | None,
    settings: TrainSettings,
    checkpoint_path: str,
    parallel: DataParallel | None = None,
) -> dict:
    """Train `model` (resuming from `checkpoint_path` if present) and return its measured result.

    With `parallel` (torchrun), every process trains a replica on its share of each batch; rank 0
    alone reads and writes the checkpoint (sending what it read to the others), evaluates, and
    returns the full result (the other ranks' results lack the evaluation).

    `teacher_logits` (`[N, K]`, aligned with the training images) feed the distillation
    objectives. "loss_seconds" is the time spent in the objective's forward and backward,
    measured by cutting the autograd graph at the logits.
    """
    device = data.train_images.device
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    history: list[dict] = []
    if parallel is None:
        checkpoint = load_checkpoint(checkpoint_path, device)
    else:  # read on rank 0's machine, sent through the CPU (load_state_dict moves it to device)
        checkpoint = parallel.broadcast(
            load_checkpoint(checkpoint_path, torch.device("cpu")) if parallel.is_main else None)
    main = parallel is None or parallel.is_main
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        history = checkpoint["history"]
        if checkpoint.get("result") is not None:
            return checkpoint["result"]

    def state(result: dict | None) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "history": history, "result": result}

    replica = parallel.wrap(model) if parallel is not None else None
    samples = len(data.train_labels)
    steps_per_epoch = -(-samples // settings.batch_size)
    bar = tqdm(total=settings.epochs * steps_per_epoch, initial=len(history) * steps_per_epoch,
               desc=f"{name:>13}", unit="step", disable=not settings.progress, leave=True)
    for epoch in range(len(history), settings.epochs):
        model.train()
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
        epoch_start, loss_seconds, loss_sum = time.perf_counter(), 0.0, 0.0
        for start in range(0, samples, settings.batch_size):
            index = order[start:start + settings.batch_size]
            index = (index if parallel is None else parallel.shard(index)).to(device)
            logits = forward(model, data.train_images[index], replica)
            cut = logits.detach().requires_grad_()
            teacher = teacher_logits[index] if teacher_logits is not None else None
            _synchronize(device)
            loss_start = time.perf_counter()
            loss = objective(cut, teacher, data.train_labels[index])
            loss.backward()
            _synchronize(device)
            loss_seconds += time.perf_counter() - loss_start
            optimizer.zero_grad(set_to_none=True)
            logits.backward(cut.grad)
            optimizer.step()
            loss_value = loss.item()
            loss_sum += loss_value * len(index)
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.3f}")
        schedule.step()
        history.append({
            "epoch": epoch + 1,
            "train_loss": (loss_sum if parallel is None else parallel.sum(loss_sum)) / samples,
            "test_accuracy": accuracy(model, data.test_images, data.test_labels, settings.batch_size)
            if main else None,
            "loss_seconds": loss_seconds,
            "epoch_seconds": time.perf_counter() - epoch_start,
        })
        if main:  # the other ranks do not evaluate
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", test_acc=f"{history[-1]['test_accuracy']:.3f}")
        if main:
            save_checkpoint(checkpoint_path, state(None))
    bar.close()
    result = measure(model, data.test_images, data.test_labels, settings.batch_size) if main else {}
    loss_seconds = sum(entry["loss_seconds"] for entry in history)
    result.update(
        history=history,
        loss_seconds=loss_seconds,
        loss_ms_per_step=1e3 * loss_seconds / (steps_per_epoch * settings.epochs),
        train_seconds=sum(entry["epoch_seconds"] for entry in history),
    )
    if main:
        save_checkpoint(checkpoint_path, state(result))
    return result
