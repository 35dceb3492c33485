"""End-to-end runs of `python -m htakl_kernels.demo` on tiny settings: the JSON it writes, its
checkpoints, and resuming an interrupted run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from htakl_kernels.demo import training
from htakl_kernels.demo.__main__ import main
from htakl_kernels.demo.data import load_digits
from test_demo_data import write_fake_cifar10
from htakl_kernels.demo.energy import ENERGY_PER_AC_PJ, ENERGY_PER_MAC_PJ
from htakl_kernels.demo.models import build_model, lif_neuron

REPOSITORY = Path(__file__).resolve().parents[1]
# Tiny: 80 training and 80 test digits, batches of 40. The reference backend keeps these tests
# about the demo; the kernels are checked against it in their own tests.
TINY = ["--subset", "80", "--batch-size", "40", "--backend", "reference", "--no-progress", "--seed", "0"]
TIMING_KEYS = ("loss_seconds", "epoch_seconds", "loss_ms_per_step", "train_seconds")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _read(folder) -> dict:
    with open(os.path.join(folder, "results.json")) as handle:
        return json.load(handle)


def _without_timings(run: dict) -> dict:
    kept = {key: value for key, value in run.items() if key not in TIMING_KEYS}
    kept["history"] = [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in run["history"]]
    return kept


def test_quick_run_writes_results_plot_and_checkpoints(tmp_path):
    out = tmp_path / "quick"
    completed = subprocess.run(
        [sys.executable, "-m", "htakl_kernels.demo", "--quick", "--epochs", "1", *TINY, "--out", str(out)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "CE + HTA-KL" in completed.stdout and "ANN teacher" in completed.stdout
    results = _read(out)
    assert results["config"]["quick"] is True and results["config"]["epochs"] == 1
    assert results["config"]["timesteps"] == 4
    assert results["dataset"] == {"name": "digits", "train_images": 80, "test_images": 80,
                                  "image_shape": [1, 8, 8], "classes": 10}
    assert results["environment"]["kernel_backend"] == "reference"
    teacher = results["teacher"]
    assert teacher["firing_rates"] == {} and teacher["synaptic_ops_per_image"] == 0
    assert teacher["macs_per_image"] > 0
    assert set(results["students"]) == {"ce", "kl", "htakl"}
    steps = math.ceil(80 / 40)
    for run in [teacher, *results["students"].values()]:
        assert len(run["history"]) == 1
        assert 0 <= run["test_accuracy"] <= 1
        assert run["test_accuracy"] == run["history"][-1]["test_accuracy"]
        assert run["images"] == 80
        energy_pj = run["synaptic_ops_per_image"] * ENERGY_PER_AC_PJ + run["macs_per_image"] * ENERGY_PER_MAC_PJ
        assert run["energy_uj_per_image"] == pytest.approx(energy_pj * 1e-6, rel=1e-12)
        assert run["loss_seconds"] > 0
        assert run["loss_ms_per_step"] == pytest.approx(1e3 * run["loss_seconds"] / steps)
    for run in results["students"].values():
        assert list(run["firing_rates"]) == ["body.0", "body.2", "body.6"]
        # After two steps a deep layer may still be silent; the first one fires.
        assert all(0 <= rate <= 1 for rate in run["firing_rates"].values())
        assert 0 < run["firing_rates"]["body.0"] < 1 and 0 < run["overall_firing_rate"] < 1
        assert run["synaptic_ops_per_image"] > 0
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ["config.json", "teacher.pt", "student-ce.pt", "student-kl.pt", "student-htakl.pt"]:
        assert (out / name).is_file()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return out


def test_checkpoints_reload_to_the_reported_accuracy(finished_run):
    results = _read(finished_run)
    data = load_digits(seed=0).subset(80, seed=0)
    checkpoint = torch.load(finished_run / "student-htakl.pt", weights_only=False)
    student = build_model("small", data.image_shape, 10, timesteps=4,
                          neuron=lambda: lif_neuron("reference"))
    student.load_state_dict(checkpoint["model"])
    assert checkpoint["result"]["test_accuracy"] == results["students"]["htakl"]["test_accuracy"]
    assert training.accuracy(student, data.test_images, data.test_labels, 40) == \
        results["students"]["htakl"]["test_accuracy"]
    teacher = build_model("small", data.image_shape, 10)
    teacher.load_state_dict(torch.load(finished_run / "teacher.pt", weights_only=False)["model"])
    assert training.accuracy(teacher, data.test_images, data.test_labels, 40) == results["teacher"]["test_accuracy"]


class SimulatedCrash(Exception):
    pass


def test_interrupted_run_resumes_to_the_uninterrupted_result(finished_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real_save = training.save_checkpoint
    saved = []

    def save_then_crash(path, state):
        # Teacher: epoch 1, epoch 2, result; CE student: the same; the KL student dies in epoch 2.
        if len(saved) == 7:
            raise SimulatedCrash
        saved.append(os.path.basename(path))
        real_save(path, state)

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        main([*TINY, "--epochs", "2", "--out", str(out)])
    assert not (out / "results.json").exists()
    assert saved[-1] == "student-kl.pt"

    saved.clear()
    monkeypatch.setattr(training, "save_checkpoint", lambda path, state: (
        saved.append(os.path.basename(path)), real_save(path, state)))
    assert main(["--resume", str(out), "--no-progress"]) == 0
    # Nothing finished was trained again: the KL student's last epoch and result, then HTA-KL.
    assert saved == ["student-kl.pt"] * 2 + ["student-htakl.pt"] * 3
    resumed, uninterrupted = _read(out), _read(finished_run)
    assert _without_timings(resumed["teacher"]) == _without_timings(uninterrupted["teacher"])
    for method in ("ce", "kl", "htakl"):
        assert _without_timings(resumed["students"][method]) == \
            _without_timings(uninterrupted["students"][method]), method


def test_resume_refuses_changed_options(finished_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(finished_run), "--epochs", "3"])
    assert exit_info.value.code == 2
    assert "--epochs 3 (the run used 2)" in capsys.readouterr().err


def test_unavailable_backend_fails_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--backend cuda: backend 'cuda' is not available"):
        main([*TINY, "--backend", "cuda", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_cifar_folder_and_resnet20_through_the_command_line(tmp_path):
    write_fake_cifar10(str(tmp_path / "cifar-10-batches-py"), per_batch=4)
    out = tmp_path / "run"
    assert main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--arch", "resnet20",
                 "--timesteps", "2", "--epochs", "1", "--batch-size", "10", "--backend", "reference",
                 "--no-progress", "--out", str(out)]) == 0
    results = _read(out)
    assert results["dataset"] == {"name": "cifar10", "train_images": 20, "test_images": 4,
                                  "image_shape": [3, 32, 32], "classes": 10}
    for run in results["students"].values():
        # 19 spiking layers: the stem's, two per basic block (9 blocks).
        assert len(run["firing_rates"]) == 19
        assert run["layer_operations_per_image"]["stem.0"] == {"AC": 0, "MAC": 16 * 32 * 32 * 3 * 9}
