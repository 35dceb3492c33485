"""`python -m htakl_kernels.demo`: distil spiking students from an ANN teacher with HTA-KL.

For each of --seeds seeds, trains an ANN teacher, then three spiking students (MultiStepLIF,
T steps) from the same initial weights with (a) cross-entropy only, (b) CE + standard KL
distillation, (c) CE + HTA-KL (`htakl_kernels.SpikingKDLoss`), and reports for each, as mean ±
std over the seeds: test accuracy, per-layer firing rates, the 45 nm energy estimate (energy.py)
and the time spent in the loss, plus the paired accuracy differences between the methods. Seeds
are --seed, --seed + 1, ...; they change the initial weights and the data order, while the
train/test split stays the one drawn with --seed. Writes `config.json`, per-seed checkpoints
(`seed-<s>/teacher.pt`, `seed-<s>/student-<method>.pt`), `results.json` and `summary.png` to
`--out` (default `runs/<UTC timestamp>/`). `--resume DIR` continues an interrupted run in DIR
with the options saved there.

Under `torchrun --nproc_per_node=N -m htakl_kernels.demo ...` the N processes train with
DistributedDataParallel (gloo on CPU, NCCL with one GPU per process), each on its share of every
batch; rank 0 reads and writes the files, evaluates and prints (parallel.py).

The default dataset is scikit-learn's bundled 8x8 digits (no download).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import torch

from .._backends import BACKENDS, resolve_backend
from .data import DATASETS, DatasetError, load_dataset
from .models import ARCHITECTURES, build_model, lif_neuron
from .parallel import DataParallel
from .plotting import plot_results
from .training import (
    METHOD_TITLES, METHODS, TEACHER_TITLE, TrainSettings, make_objective, predict, train_run,
)
from .summary import format_table, summarise

DEFAULTS = dict(
    dataset="digits", data_dir=None, arch="small", epochs=5, timesteps=4, alpha=0.5,
    temperature=2.0, delta=0.5, seed=0, seeds=8, batch_size=64, lr=1e-3, subset=None, quick=False,
    device="auto", backend="auto", threads=1, out=None, progress=True,
)
# --quick: what it changes, unless given explicitly.
QUICK = dict(epochs=2, subset=400, batch_size=32, seeds=3)
# Options that only say where or how to run: they may differ when a run is resumed.
RUNTIME_OPTIONS = ("device", "backend", "threads", "progress")


def _number(kind, low=None, high=None, low_open=False):
    def parse(text: str):
        value = kind(text)
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: parse_args returns only the options given, so that --quick and --resume can tell
    # an explicit value from a default.
    parser = argparse.ArgumentParser(
        prog="python -m htakl_kernels.demo", argument_default=argparse.SUPPRESS,
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    quick_options = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in QUICK.items())
    add("--dataset", choices=DATASETS, help=f"default {DEFAULTS['dataset']}")
    add("--data-dir", help="folder with the CIFAR python batches (cifar10/cifar100)")
    add("--arch", choices=ARCHITECTURES, help=f"student and teacher architecture (default {DEFAULTS['arch']})")
    add("--epochs", type=_number(int, 1), help=f"epochs per run (default {DEFAULTS['epochs']})")
    add("--timesteps", type=_number(int, 1), help=f"SNN time steps T (default {DEFAULTS['timesteps']})")
    add("--alpha", type=_number(float, 0, 1), help=f"distillation weight (default {DEFAULTS['alpha']})")
    add("--temperature", type=_number(float, 0, low_open=True),
        help=f"distillation temperature (default {DEFAULTS['temperature']})")
    add("--delta", type=_number(float, 0, 1, low_open=True),
        help=f"HTA-KL head mass (default {DEFAULTS['delta']})")
    add("--seed", type=int, help=f"the first seed; also draws the train/test split (default {DEFAULTS['seed']})")
    add("--seeds", type=_number(int, 1),
        help=f"train every run with this many seeds, --seed, --seed + 1, ... (default {DEFAULTS['seeds']})")
    add("--batch-size", type=_number(int, 1), help=f"default {DEFAULTS['batch_size']}")
    add("--lr", type=_number(float, 0, low_open=True), help=f"Adam learning rate (default {DEFAULTS['lr']})")
    add("--subset", type=_number(int, 1), help="use at most this many training and test images")
    add("--quick", action="store_const", const=True,
        help=f"a short run: {quick_options} unless given")
    add("--device", help="auto (cuda if available), cpu, cuda, cuda:N (default auto)")
    add("--backend", choices=BACKENDS, help="kernel backend for the loss and the LIF neuron (default auto)")
    add("--threads", type=_number(int, 1),
        help="CPU threads for torch (default 1: the demo's tensors are small, and more threads than "
             "free cores slow every operation down on a shared machine)")
    add("--out", help="output folder (default runs/<UTC timestamp>)")
    add("--resume", metavar="DIR", help="continue the run in DIR with the options saved there")
    add("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    return parser


def resolve_config(argv: list[str] | None) -> dict:
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    resume = given.pop("resume", None)
    if resume is None:
        config = DEFAULTS | (QUICK if given.get("quick") else {}) | given
        config["out"] = config["out"] or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        return config
    saved_path = os.path.join(resume, "config.json")
    if not os.path.isfile(saved_path):
        parser.error(f"--resume {resume}: no config.json there; is it the --out folder of a run?")
    with open(saved_path) as handle:
        saved = json.load(handle)
    missing = sorted(set(DEFAULTS) - set(saved))
    if missing:
        parser.error(f"--resume {resume}: its config.json lacks {', '.join(missing)}; it was written "
                     f"by an older version of the demo, whose runs cannot be continued")
    given["out"] = os.path.normpath(given.get("out", resume))
    if given["out"] != os.path.normpath(resume):
        parser.error("--out and --resume name different folders; a run resumes in its own folder")
    conflicts = [
        f"--{key.replace('_', '-')} {value} (the run used {saved.get(key)})"
        for key, value in given.items()
        if key not in RUNTIME_OPTIONS and key != "out" and value != saved.get(key)
    ]
    if conflicts:
        parser.error(f"--resume {resume} continues with the saved options; these differ: {'; '.join(conflicts)}")
    return saved | given


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch has no usable CUDA device")
    return device


def train_seed(seed: int, config: dict, data, neuron, device: torch.device,
               parallel: DataParallel | None = None) -> dict:
    """The teacher and the three students of one seed, checkpointed in `<out>/seed-<seed>/`."""
    main = parallel is None or parallel.is_main
    folder = os.path.join(config["out"], f"seed-{seed}")
    if main:
        os.makedirs(folder, exist_ok=True)
    prefix = f"[seed {seed}] " if config["seeds"] > 1 else ""
    settings = TrainSettings(config["epochs"], config["batch_size"], config["lr"], seed,
                             config["progress"] and main)
    options = dict(alpha=config["alpha"], temperature=config["temperature"], delta=config["delta"],
                   backend=config["backend"])

    def checkpoint(name: str) -> str:
        return os.path.join(folder, f"{name}.pt")

    torch.manual_seed(seed)
    teacher = build_model(config["arch"], data.image_shape, data.num_classes).to(device)
    teacher_result = train_run(prefix + TEACHER_TITLE, teacher, data, make_objective("ce", **options), None,
                               settings, checkpoint("teacher"), parallel)
    teacher_logits = predict(teacher, data.train_images, settings.batch_size)
    if parallel is not None:  # rank 0's, whatever the replicas' buffers did in their last steps
        teacher_logits = parallel.broadcast(teacher_logits.cpu()).to(device)

    students = {}
    for method in METHODS:
        torch.manual_seed(seed)  # the same initial weights for every student
        student = build_model(config["arch"], data.image_shape, data.num_classes,
                              timesteps=config["timesteps"], neuron=neuron).to(device)
        students[method] = train_run(f"{prefix}SNN {METHOD_TITLES[method]}", student, data,
                                     make_objective(method, **options), teacher_logits, settings,
                                     checkpoint(f"student-{method}"), parallel)
    return {"seed": seed, "teacher": teacher_result, "students": students}


def run(config: dict, parallel: DataParallel | None = None) -> dict | None:
    """Train and report; under torchrun every process trains, and rank 0 alone writes and
    returns the results (the others return None)."""
    device = resolve_device(config["device"]) if parallel is None else parallel.use_device(config["device"])
    main = parallel is None or parallel.is_main
    try:  # fail now rather than after training the teacher
        kernel_backend = resolve_backend(config["backend"], device)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"error: --backend {config['backend']}: {error}") from error
    torch.set_num_threads(config["threads"])
    out = config["out"]
    if main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2)
    started = time.perf_counter()

    # One split for every seed, so that the seeds measure the training's noise on the same test set.
    data = load_dataset(config["dataset"], config["data_dir"], config["seed"])
    if config["subset"] is not None:
        data = data.subset(config["subset"], config["seed"])
    data = data.to(device)
    neuron = functools.partial(lif_neuron, backend=config["backend"])
    seed_runs = [
        train_seed(seed, config, data, neuron, device, parallel)
        for seed in range(config["seed"], config["seed"] + config["seeds"])
    ]
    if not main:
        return None
    layers = build_model(config["arch"], data.image_shape, data.num_classes,
                         timesteps=config["timesteps"], neuron=neuron).neuron_labels()
    results = {
        "config": config,
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "kernel_backend": kernel_backend,
            "processes": 1 if parallel is None else parallel.world,
        },
        "dataset": {
            "name": data.name, "train_images": len(data.train_labels), "test_images": len(data.test_labels),
            "image_shape": list(data.image_shape), "classes": data.num_classes,
        },
        "spiking_layers": layers,
        "summary": summarise(seed_runs),
        "seeds": seed_runs,
        "wall_seconds": time.perf_counter() - started,
        "plot": "summary.png",
    }
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    plot_results(results, os.path.join(out, "summary.png"))
    return results


def main(argv: list[str] | None = None) -> int:
    parallel = DataParallel.from_environment()
    if parallel is None:
        config = resolve_config(argv)
    else:  # rank 0 reads the options (and a resumed run's folder) for every process
        config = parallel.broadcast(resolve_config(argv) if parallel.is_main else None)
    try:
        results = run(config, parallel)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if parallel is not None:
            parallel.close()
    if results is None:  # a rank other than 0 under torchrun
        return 0
    print()
    print(format_table(results["summary"]))
    print(f"\n{results['dataset']['name']}, arch {config['arch']}, T={config['timesteps']}, "
          f"{config['epochs']} epochs, {config['seeds']} seed(s), "
          f"kernel backend {results['environment']['kernel_backend']}, "
          f"{results['wall_seconds']:.0f} s. Results, checkpoints and plot in {config['out']}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
