"""Statistics over seeds: each run's metrics as mean ± standard deviation, and the printed table.

A run of the demo trains the teacher and the three students once per seed; `summarise` turns the
per-seed records (`{"seed", "teacher", "students"}`, as in results.json) into one record of the
same shape whose numbers are `{"mean", "std", "values"}`. The standard deviation is the sample
one (n - 1 in the denominator), None for a single seed. Because every seed trains all three
students from the same initial weights, in the same data order and against the same teacher,
the per-seed accuracy differences between methods are paired; `summarise` reports their mean ±
std too, which is the fairer test of whether one method beats another.
"""

from __future__ import annotations

import math

from .training import METHOD_TITLES, METHODS, titled_runs

# The per-run numbers that are summarised (firing rates per layer come on top).
METRICS = ("test_accuracy", "overall_firing_rate", "energy_uj_per_image", "synaptic_ops_per_image",
           "macs_per_image", "loss_seconds", "loss_ms_per_step")
# Paired test-accuracy differences reported: (method, baseline).
DIFFERENCES = (("kl", "ce"), ("htakl", "ce"), ("htakl", "kl"))


def mean_std(values: list[float]) -> dict:
    """`{"mean", "std", "values"}`; std is the sample standard deviation, None for one value."""
    values = [float(value) for value in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(values) / len(values)
    std = None if len(values) == 1 else math.sqrt(
        math.fsum((value - mean) ** 2 for value in values) / (len(values) - 1))
    return {"mean": mean, "std": std, "values": values}


def _summarise_runs(runs: list[dict]) -> dict:
    summary = {metric: mean_std([run[metric] for run in runs]) for metric in METRICS}
    summary["firing_rates"] = {
        layer: mean_std([run["firing_rates"][layer] for run in runs]) for layer in runs[0]["firing_rates"]
    }
    return summary


def summarise(seed_runs: list[dict]) -> dict:
    """The per-seed records' teacher and students as mean ± std, plus the paired differences
    of test accuracy `"<method>-<baseline>"` (method minus baseline, per seed)."""
    if not seed_runs:
        raise ValueError("summarise needs at least one seed's record")
    return {
        "seeds": [record["seed"] for record in seed_runs],
        "teacher": _summarise_runs([record["teacher"] for record in seed_runs]),
        "students": {
            method: _summarise_runs([record["students"][method] for record in seed_runs])
            for method in METHODS
        },
        "accuracy_differences": {
            f"{method}-{baseline}": mean_std([
                record["students"][method]["test_accuracy"] - record["students"][baseline]["test_accuracy"]
                for record in seed_runs
            ])
            for method, baseline in DIFFERENCES
        },
    }


def format_mean_std(statistic: dict, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """"99.16 ± 0.21 %": the mean, then the std when there is one (more than one seed)."""
    text = f"{scale * statistic['mean']:.{digits}f}"
    if statistic["std"] is not None:
        text += f" ± {scale * statistic['std']:.{digits}f}"
    return text + (f" {unit}" if unit else "")


def format_table(summary: dict) -> str:
    """The printed table of a `summarise` result, then the paired accuracy differences."""
    header = ("run", "test acc", "firing rate", "energy/image", "SOPs/image", "MACs/image",
              "loss time", "loss/step")
    rows = []
    for title, run in titled_runs(summary).items():
        spiking = bool(run["firing_rates"])
        rows.append((
            title,
            format_mean_std(run["test_accuracy"], 100, unit="%"),
            format_mean_std(run["overall_firing_rate"], 100, unit="%") if spiking else "-",
            format_mean_std(run["energy_uj_per_image"], digits=3, unit="uJ"),
            f"{run['synaptic_ops_per_image']['mean'] / 1e6:.3f} M",
            f"{run['macs_per_image']['mean'] / 1e6:.3f} M",
            f"{run['loss_seconds']['mean']:.2f} s",
            f"{run['loss_ms_per_step']['mean']:.2f} ms",
        ))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    seeds = summary["seeds"]
    if len(seeds) > 1:
        lines.append(f"\nmean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
                     "SOPs, MACs and loss times are means")
        lines.append("paired test-accuracy differences (same seed, same initial weights):")
        for key, difference in summary["accuracy_differences"].items():
            method, baseline = key.split("-")
            within = abs(difference["mean"]) <= difference["std"]
            # + 0.0 turns a mean that rounds to -0.00 (equal methods, float residue) into +0.00.
            mean = round(100 * difference["mean"], 2) + 0.0
            lines.append(
                f"  {METHOD_TITLES[method]} - {METHOD_TITLES[baseline]}: "
                f"{mean:+.2f} ± {100 * difference['std']:.2f} points"
                + ("  (within noise: |mean| <= std)" if within else "")
            )
    return "\n".join(lines)
