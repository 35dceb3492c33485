"""The run's figure: test accuracy per epoch, and per-layer firing rates of each student."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .training import METHOD_TITLES, TEACHER_TITLE, titled_runs  # noqa: E402


# One colour per run in both panels.
COLOURS = {TEACHER_TITLE: "tab:gray"} | {
    title: colour for title, colour in zip(METHOD_TITLES.values(), ("tab:blue", "tab:orange", "tab:green"))
}


def plot_results(results: dict, path: str) -> None:
    figure, (curves, rates) = plt.subplots(1, 2, figsize=(12, 4.5))
    for title, run in titled_runs(results).items():
        epochs = [entry["epoch"] for entry in run["history"]]
        accuracies = [100 * entry["test_accuracy"] for entry in run["history"]]
        curves.plot(epochs, accuracies, marker="o", markersize=3, label=title, color=COLOURS[title],
                    linestyle="--" if title == TEACHER_TITLE else "-")
    curves.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    curves.legend()

    students = results["students"]
    layers = list(next(iter(students.values()))["firing_rates"]) if students else []
    width = 0.8 / max(len(students), 1)
    for offset, (method, run) in enumerate(students.items()):
        positions = [index + (offset - (len(students) - 1) / 2) * width for index in range(len(layers))]
        rates.bar(positions, [100 * run["firing_rates"][layer] for layer in layers], width,
                  label=METHOD_TITLES[method], color=COLOURS[METHOD_TITLES[method]])
    rates.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    rates.set(ylabel="firing rate (% of neuron-steps)", title="Per-layer firing rate (test set)")
    rates.grid(axis="y", alpha=0.3)
    rates.legend()

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
