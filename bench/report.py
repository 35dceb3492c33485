"""Writes a suite's results: a text table on stdout, JSON, a Markdown table and PNG plots."""

from __future__ import annotations

import json
import os
from collections import defaultdict


def _ms(timing: dict) -> str:
    return f"{timing['median_s'] * 1e3:.4g} ({timing['iqr_s'] * 1e3:.2g})"


def _optional(value, scale: float, digits: str) -> str:
    return "n/a" if value is None else format(value * scale, digits)


def _saved_per_element(row: dict) -> float | None:
    saved = row.get("saved_for_backward")
    if saved is None:
        return None
    return (saved["residual_bytes"] + saved["reread_bytes"]) / row["elements"]


def baselines(rows: list[dict]) -> list[str]:
    """Baselines that ran somewhere in the suite, in first-seen order."""
    names = []
    for row in rows:
        if row["role"] == "baseline" and row["status"] == "ok" and row["implementation"] not in names:
            names.append(row["implementation"])
    return names


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results of every implementation that ran."""
    compared = baselines(rows)
    # The GPU's own time (profiler), where it was measured: the calls' time can be the host's.
    with_device = any(row.get("forward_backward_device_s") for row in rows if row["status"] == "ok")
    header = [
        "case", "dtype", "implementation", "fwd+bwd ms (IQR)", "fwd ms (IQR)", "GB/s",
        "% of copy", "saved B/elem", "peak extra MiB",
    ] + (["GPU ms", "GPU % of copy"] if with_device else []) + [f"x vs {name}" for name in compared]
    cells = []
    for row in rows:
        if row["status"] != "ok":
            continue
        speedups = row["speedup"]["forward_backward"]
        cells.append([
            row["case"], row["dtype"], row["implementation"],
            _ms(row["forward_backward"]), _ms(row["forward"]),
            _optional(row.get("bandwidth_bytes_per_s"), 1e-9, ".4g"),
            _optional(row.get("fraction_of_copy_bandwidth"), 100, ".3g"),
            _optional(_saved_per_element(row), 1, ".3g"),
            _optional(row["peak_extra_bytes"], 1 / 2**20, ".4g"),
        ] + ([_optional(row.get("forward_backward_device_s"), 1e3, ".4g"),
              _optional(row.get("device_fraction_of_copy_bandwidth"), 100, ".3g")]
             if with_device else [])
          + [_optional(speedups.get(name), 1, ".3g") for name in compared])
    return header, cells


def notes(rows: list[dict]) -> list[str]:
    """One line per implementation and reason it did not run, with the cases it concerns."""
    grouped = defaultdict(list)
    for row in rows:
        if row["status"] != "ok":
            grouped[(row["implementation"], row["status"], row.get("note", ""))].append(
                f"{row['case']} {row['dtype']}"
            )
    return [
        f"{name}: {status} ({', '.join(cases)}): {note}"
        for (name, status, note), cases in grouped.items()
    ]


def text_table(header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(line[column]) for line in [header] + cells) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line, widths)) for line in [header] + cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _escape(value: str) -> str:
    return value.replace("|", "\\|")


def markdown(result: dict) -> str:
    header, cells = table(result["rows"])
    copy = result["copy_bandwidth"]
    lines = [
        f"# {result['suite']} benchmark on {result['device']['description']}",
        "",
    ]
    if result["interrupted"]:
        lines += ["**Interrupted: only the cases below were measured.**", ""]
    lines += [
        f"- date: {result['date']}; command: `{result['command']}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items() if v)}",
        f"- device-to-device copy bandwidth (read + write): {copy['bytes_per_s'] / 1e9:.4g} GB/s",
        f"- {result['byte_model']}",
        "- times: median (IQR) per call in ms; fwd+bwd = forward and backward of a training step, "
        "fwd = its forward alone (inputs require grad); `x vs B` = B's fwd+bwd time / this one's"
        + ("; GPU ms = the device work of one fwd+bwd (torch.profiler, 10 calls), which the call "
           "times exceed when the host is the slower side" if "GPU ms" in header else ""),
        "",
        "| " + " | ".join(map(_escape, header)) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(map(_escape, line)) + " |" for line in cells]
    skipped = notes(result["rows"])
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {_escape(line)}" for line in skipped]
    return "\n".join(lines) + "\n"


def plot(result: dict, x_key: str, x_label: str, path_prefix: str) -> list[str]:
    """Time and fraction of copy bandwidth against `x_key`, one panel per dtype.

    For the loss only 2-D students are drawn: a time input at the same C is another curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        row for row in result["rows"]
        if row["status"] == "ok" and row["dims"].get(x_key)
        and (x_key != "classes" or row["dims"]["steps"] is None)
    ]
    dtypes = sorted({row["dtype"] for row in rows}) or ["(none)"]
    written = []
    for name, value, label in (
        ("time", lambda row: row["forward_backward"]["median_s"] * 1e3, "fwd+bwd median (ms)"),
        ("bandwidth", lambda row: row.get("fraction_of_copy_bandwidth"), "fraction of copy bandwidth"),
    ):
        figure, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
        for axis, dtype in zip(axes[0], dtypes):
            series = defaultdict(list)
            for row in rows:
                if row["dtype"] == dtype and value(row) is not None:
                    series[row["implementation"]].append((row["dims"][x_key], value(row)))
            for implementation, points in series.items():
                points.sort()
                axis.plot(*zip(*points), marker="o", label=implementation)
            axis.set_xscale("log", base=2)
            if name == "time":
                axis.set_yscale("log")
            axis.set_xlabel(x_label)
            axis.set_ylabel(label)
            axis.set_title(f"{result['suite']} {dtype} on {result['device']['description']}", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
            if series:
                axis.legend(fontsize=7)
        figure.tight_layout()
        path = f"{path_prefix}-{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write(result: dict, folder: str, stem: str, x_key: str, x_label: str) -> list[str]:
    """All output files of one suite run; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    json_path = os.path.join(folder, f"{stem}.json")
    with open(json_path, "w") as handle:
        json.dump(result, handle, indent=1)
    markdown_path = os.path.join(folder, f"{stem}.md")
    with open(markdown_path, "w") as handle:
        handle.write(markdown(result))
    return [json_path, markdown_path] + plot(result, x_key, x_label, os.path.join(folder, stem))

