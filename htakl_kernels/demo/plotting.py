"""The run's figure: test accuracy per epoch, and per-layer firing rates of each student.

Both panels show the mean over the seeds; with more than one seed, a band (accuracy) or an
error bar (firing rate) spans one standard deviation either side.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .summary import mean_std  # noqa: E402
from .training import METHOD_TITLES, TEACHER_TITLE, titled_runs  # noqa: E402


# One colour per run in both panels.
COLOURS = {TEACHER_TITLE: "tab:gray"} | {
    title: colour for title, colour in zip(METHOD_TITLES.values(), ("tab:blue", "tab:orange", "tab:green"))
}


def _accuracy_curves(axes, seed_runs: list[dict]) -> None:
    for title in titled_runs(seed_runs[0]):
        histories = [titled_runs(record)[title]["history"] for record in seed_runs]
        epochs = [entry["epoch"] for entry in histories[0]]
        per_epoch = [mean_std([100 * history[index]["test_accuracy"] for history in histories])
                     for index in range(len(epochs))]
        means = [statistic["mean"] for statistic in per_epoch]
        axes.plot(epochs, means, marker="o", markersize=3, label=title, color=COLOURS[title],
                  linestyle="--" if title == TEACHER_TITLE else "-")
        if len(seed_runs) > 1:
            stds = [statistic["std"] for statistic in per_epoch]
            axes.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=COLOURS[title], alpha=0.15, linewidth=0)
    axes.set(xlabel="epoch", ylabel="test accuracy (%)",
             title="Test accuracy" + (f" (mean ± std, {len(seed_runs)} seeds)" if len(seed_runs) > 1 else ""))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()


def _firing_rates(axes, students: dict, layers: dict[str, str]) -> None:
    """`students`: method -> summarised run; `layers`: module path -> readable label."""
    paths = list(layers)
    width = 0.8 / max(len(students), 1)
    for offset, (method, run) in enumerate(students.items()):
        positions = [index + (offset - (len(students) - 1) / 2) * width for index in range(len(paths))]
        rates = [run["firing_rates"][path] for path in paths]
        errors = [100 * rate["std"] for rate in rates] if all(rate["std"] is not None for rate in rates) else None
        axes.bar(positions, [100 * rate["mean"] for rate in rates], width, yerr=errors, capsize=2,
                 label=METHOD_TITLES[method], color=COLOURS[METHOD_TITLES[method]])
    crowded = len(paths) > 6  # the ResNets' and VGG's labels overlap unless slanted
    axes.set_xticks(range(len(paths)), [layers[path] for path in paths],
                    rotation=45 if crowded else 0, ha="right" if crowded else "center")
    axes.set(xlabel="spiking layer (named after the layer that feeds it)",
             ylabel="firing rate (% of neuron-steps)", title="Per-layer firing rate (test set)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()


def plot_results(results: dict, path: str) -> None:
    """summary.png of a results.json (per-seed records, their summary, the layer labels)."""
    figure, (curves, rates) = plt.subplots(1, 2, figsize=(12, 4.5))
    _accuracy_curves(curves, results["seeds"])
    _firing_rates(rates, results["summary"]["students"], results["spiking_layers"])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
