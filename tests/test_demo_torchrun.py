"""The demo under torchrun: two CPU processes (gloo) train with DistributedDataParallel, rank 0
writes the results, and the accuracies are within noise of the one-process run; an interrupted
two-process run resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.demo

REPOSITORY = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600
QUICK = ["--quick", "--no-progress", "--backend", "cpu", "--seed", "0"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(processes: int, arguments: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               "-m", "htakl_kernels.demo", *arguments]
    return subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def _demo(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "htakl_kernels.demo", *arguments], cwd=REPOSITORY,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _accuracies(results: dict) -> dict[str, dict]:
    summary = results["summary"]
    return {"teacher": summary["teacher"]["test_accuracy"]} | {
        method: run["test_accuracy"] for method, run in summary["students"].items()}


def test_two_processes_match_one_within_noise(tmp_path):
    parallel = _torchrun(2, [*QUICK, "--out", str(tmp_path / "two")])
    assert parallel.returncode == 0, parallel.stderr[-4000:]
    single = _demo([*QUICK, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-4000:]
    # Rank 0 alone prints the table and writes the files.
    assert parallel.stdout.count("CE + HTA-KL") == single.stdout.count("CE + HTA-KL") >= 1
    two, one = _results(tmp_path / "two"), _results(tmp_path / "one")
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    test_images = one["dataset"]["test_images"]
    for name, accuracy in _accuracies(one).items():
        other = _accuracies(two)[name]
        # Within noise: the means differ by less than twice the larger seed-to-seed std, plus
        # two test images (the split of every batch changes the summation order, hence the run).
        noise = 2 * max(accuracy["std"], other["std"]) + 2 / test_images
        assert abs(accuracy["mean"] - other["mean"]) <= noise, (name, accuracy, other)
    for seed in one["summary"]["seeds"]:
        assert (tmp_path / "two" / f"seed-{seed}" / "student-htakl.pt").is_file()


def test_two_processes_resume(tmp_path):
    out = tmp_path / "run"
    finished = _torchrun(2, [*QUICK, "--seeds", "1", "--out", str(out)])
    assert finished.returncode == 0, finished.stderr[-4000:]
    expected = _results(out)
    # An interruption before the HTA-KL student: resuming loads the teacher and the other
    # students from rank 0's checkpoints (sent to rank 1) and trains that student alone, to the
    # same result.
    os.remove(out / "seed-0" / "student-htakl.pt")
    os.remove(out / "results.json")
    resumed = _torchrun(2, ["--resume", str(out), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    got = _results(out)
    assert (out / "seed-0" / "student-htakl.pt").is_file()
    for name, accuracy in _accuracies(expected).items():
        assert _accuracies(got)[name]["values"] == accuracy["values"], name
    losses = [[entry["train_loss"] for entry in results["seeds"][0]["students"]["htakl"]["history"]]
              for results in (expected, got)]
    assert losses[0] == losses[1]
