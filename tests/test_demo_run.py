"""End-to-end runs of `python -m htakl_kernels.demo` on tiny settings: the JSON it writes, its
per-seed records and checkpoints, and resuming an interrupted run."""

from __future__ import annotations

import json
import math
import os
import statistics
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
# Tiny: 80 training and 80 test digits, batches of 40, one seed unless a test asks for more. The
# reference backend keeps these tests about the demo; the kernels are checked against it in their
# own tests.
TINY = ["--subset", "80", "--batch-size", "40", "--backend", "reference", "--no-progress", "--seed", "0",
        "--seeds", "1"]
SMALL_LAYERS = {"body.0": "conv1", "body.2": "conv2", "body.6": "fc1"}
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
        [sys.executable, "-m", "htakl_kernels.demo", "--quick", "--epochs", "1", *TINY, "--seeds", "2",
         "--seed", "3", "--out", str(out)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "CE + HTA-KL" in completed.stdout and "ANN teacher" in completed.stdout
    assert "mean ± std over 2 seeds (3, 4)" in completed.stdout
    results = _read(out)
    assert results["config"]["quick"] is True and results["config"]["epochs"] == 1
    assert results["config"]["timesteps"] == 4 and results["config"]["seeds"] == 2
    assert results["dataset"] == {"name": "digits", "train_images": 80, "test_images": 80,
                                  "image_shape": [1, 8, 8], "classes": 10}
    assert results["environment"]["kernel_backend"] == "reference"
    assert results["spiking_layers"] == SMALL_LAYERS
    assert [record["seed"] for record in results["seeds"]] == [3, 4]
    steps = math.ceil(80 / 40)
    for record in results["seeds"]:
        teacher = record["teacher"]
        assert teacher["firing_rates"] == {} and teacher["synaptic_ops_per_image"] == 0
        assert teacher["macs_per_image"] > 0
        assert set(record["students"]) == {"ce", "kl", "htakl"}
        for run in [teacher, *record["students"].values()]:
            assert len(run["history"]) == 1
            assert 0 <= run["test_accuracy"] <= 1
            assert run["test_accuracy"] == run["history"][-1]["test_accuracy"]
            assert run["images"] == 80
            energy_pj = run["synaptic_ops_per_image"] * ENERGY_PER_AC_PJ + run["macs_per_image"] * ENERGY_PER_MAC_PJ
            assert run["energy_uj_per_image"] == pytest.approx(energy_pj * 1e-6, rel=1e-12)
            assert run["loss_seconds"] > 0
            assert run["loss_ms_per_step"] == pytest.approx(1e3 * run["loss_seconds"] / steps)
        for run in record["students"].values():
            assert list(run["firing_rates"]) == list(SMALL_LAYERS)
            # After two steps a deep layer may still be silent; the first one fires.
            assert all(0 <= rate <= 1 for rate in run["firing_rates"].values())
            assert 0 < run["firing_rates"]["body.0"] < 1 and 0 < run["overall_firing_rate"] < 1
            assert run["synaptic_ops_per_image"] > 0
        for name in ["teacher.pt", "student-ce.pt", "student-kl.pt", "student-htakl.pt"]:
            assert (out / f"seed-{record['seed']}" / name).is_file()
    # Different seeds: different initial weights, so different students.
    first, second = (record["students"]["ce"] for record in results["seeds"])
    assert first["history"][0]["train_loss"] != second["history"][0]["train_loss"]
    # The summary is the per-seed records' mean and sample std.
    summary = results["summary"]
    assert summary["seeds"] == [3, 4]
    for title, key in [("teacher", None), *(("students", method) for method in ("ce", "kl", "htakl"))]:
        runs = [record[title] if key is None else record[title][key] for record in results["seeds"]]
        summarised = summary[title] if key is None else summary[title][key]
        for metric in ("test_accuracy", "overall_firing_rate", "energy_uj_per_image"):
            values = [run[metric] for run in runs]
            assert summarised[metric]["values"] == values
            assert summarised[metric]["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert summarised[metric]["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
    differences = [record["students"]["htakl"]["test_accuracy"] - record["students"]["ce"]["test_accuracy"]
                   for record in results["seeds"]]
    assert summary["accuracy_differences"]["htakl-ce"]["values"] == pytest.approx(differences)
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.json").is_file()


def test_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--seeds", "0"])
    assert exit_info.value.code == 2
    assert "--seeds: must be >= 1, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    assert main([*TINY, "--epochs", "2", "--seeds", "2", "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return out


def test_checkpoints_reload_to_the_reported_accuracy(finished_run):
    results = _read(finished_run)
    data = load_digits(seed=0).subset(80, seed=0)
    for record in results["seeds"]:
        folder = finished_run / f"seed-{record['seed']}"
        checkpoint = torch.load(folder / "student-htakl.pt", weights_only=False)
        student = build_model("small", data.image_shape, 10, timesteps=4,
                              neuron=lambda: lif_neuron("reference"))
        student.load_state_dict(checkpoint["model"])
        assert checkpoint["result"]["test_accuracy"] == record["students"]["htakl"]["test_accuracy"]
        assert training.accuracy(student, data.test_images, data.test_labels, 40) == \
            record["students"]["htakl"]["test_accuracy"]
        teacher = build_model("small", data.image_shape, 10)
        teacher.load_state_dict(torch.load(folder / "teacher.pt", weights_only=False)["model"])
        assert training.accuracy(teacher, data.test_images, data.test_labels, 40) == \
            record["teacher"]["test_accuracy"]


class SimulatedCrash(Exception):
    pass


def test_interrupted_run_resumes_to_the_uninterrupted_result(finished_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real_save = training.save_checkpoint
    saved = []

    def record_save(path, state):
        saved.append(os.path.relpath(path, out))
        real_save(path, state)

    def save_then_crash(path, state):
        # Per seed, each of the four runs saves epoch 1, epoch 2 and its result: 12 saves. The
        # second seed's teacher and CE student finish (6 more), its KL student dies in epoch 2.
        if len(saved) == 12 + 7:
            raise SimulatedCrash
        record_save(path, state)

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        main([*TINY, "--epochs", "2", "--seeds", "2", "--out", str(out)])
    assert not (out / "results.json").exists()
    assert saved[-1] == os.path.join("seed-1", "student-kl.pt")

    saved.clear()
    monkeypatch.setattr(training, "save_checkpoint", record_save)
    assert main(["--resume", str(out), "--no-progress"]) == 0
    # Nothing finished was trained again: the first seed not at all, then the second seed's KL
    # student's last epoch and result, then its HTA-KL student.
    assert saved == [os.path.join("seed-1", "student-kl.pt")] * 2 + [os.path.join("seed-1", "student-htakl.pt")] * 3
    resumed, uninterrupted = _read(out), _read(finished_run)
    assert len(resumed["seeds"]) == 2
    for got, expected in zip(resumed["seeds"], uninterrupted["seeds"]):
        assert got["seed"] == expected["seed"]
        assert _without_timings(got["teacher"]) == _without_timings(expected["teacher"])
        for method in ("ce", "kl", "htakl"):
            assert _without_timings(got["students"][method]) == \
                _without_timings(expected["students"][method]), method
    for method in ("ce", "kl", "htakl"):
        assert resumed["summary"]["students"][method]["test_accuracy"] == \
            uninterrupted["summary"]["students"][method]["test_accuracy"]


def test_resume_refuses_changed_options(finished_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(finished_run), "--epochs", "3"])
    assert exit_info.value.code == 2
    assert "--epochs 3 (the run used 2)" in capsys.readouterr().err


def test_resume_refuses_a_run_of_an_older_demo(finished_run, tmp_path, capsys):
    """A config.json without options that the demo has since gained (here `seeds`) is refused
    with a message naming them, not a KeyError halfway through."""
    config = json.loads((finished_run / "config.json").read_text())
    del config["seeds"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config.json lacks seeds" in capsys.readouterr().err


def test_unavailable_backend_fails_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--backend cuda: backend 'cuda' is not available"):
        main([*TINY, "--backend", "cuda", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "seed-0").exists()


def test_cifar_folder_and_resnet20_through_the_command_line(tmp_path):
    write_fake_cifar10(str(tmp_path / "cifar-10-batches-py"), per_batch=4)
    out = tmp_path / "run"
    assert main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--arch", "resnet20",
                 "--timesteps", "2", "--epochs", "1", "--batch-size", "10", "--backend", "reference",
                 "--seeds", "1", "--no-progress", "--out", str(out)]) == 0
    results = _read(out)
    assert results["dataset"] == {"name": "cifar10", "train_images": 20, "test_images": 4,
                                  "image_shape": [3, 32, 32], "classes": 10}
    # 19 spiking layers: the stem's, two per basic block (9 blocks), named after conv1 ... conv19.
    assert list(results["spiking_layers"].values()) == [f"conv{index}" for index in range(1, 20)]
    for run in results["seeds"][0]["students"].values():
        assert list(run["firing_rates"]) == list(results["spiking_layers"])
        assert run["layer_operations_per_image"]["stem.0"] == {"AC": 0, "MAC": 16 * 32 * 32 * 3 * 9}
