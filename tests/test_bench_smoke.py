"""CI smoke test of the benchmark suite: `python -m bench --quick --device cpu` writes sane files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import htakl_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `bench` is run from the repository root, not installed
    sys.path.insert(0, ROOT)
from bench import measure  # noqa: E402
from bench import lif_suite, loss_suite  # noqa: E402
from bench.__main__ import chosen_implementations, output_folder, parse_arguments  # noqa: E402
STATUSES = {"ok", "skipped", "not implemented", "out of memory"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: the CI machine is shared, and OpenMP barriers under contention time noise.
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--threads", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    return completed, out


def test_quick_run_succeeds_and_prints_tables(quick_run):
    completed, _ = quick_run
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "loss on " in completed.stdout and "lif on " in completed.stdout
    assert "fwd+bwd ms (IQR)" in completed.stdout


@pytest.mark.parametrize("suite", ["loss", "lif"])
def test_files_are_written(quick_run, suite):
    _, out = quick_run
    for name in (f"{suite}-quick.json", f"{suite}-quick.md"):
        assert (out / name).stat().st_size > 0
    for name in (f"{suite}-quick-time.png", f"{suite}-quick-bandwidth.png"):
        with open(out / name, "rb") as image:
            assert image.read(8) == b"\x89PNG\r\n\x1a\n", name


def _result(out, suite) -> dict:
    with open(out / f"{suite}-quick.json") as handle:
        return json.load(handle)


@pytest.mark.parametrize("suite", ["loss", "lif"])
def test_json_numbers_are_positive_and_finite(quick_run, suite):
    _, out = quick_run
    result = _result(out, suite)
    assert result["suite"] == suite and result["quick"] is True
    assert result["device"]["type"] == "cpu" and result["device"]["description"]
    assert result["versions"]["torch"] == torch.__version__
    assert "--quick" in result["command"] and result["date"].startswith("20")
    assert _positive(result["copy_bandwidth"]["bytes_per_s"])
    assert result["rows"], "no rows"
    for row in result["rows"]:
        assert row["status"] in STATUSES, row
        if row["status"] != "ok":
            assert row["note"], row
            continue
        for mode in ("forward_backward", "forward"):
            assert _positive(row[mode]["median_s"]) and row[mode]["samples"] >= 1, row
            assert math.isfinite(row[mode]["iqr_s"]) and row[mode]["iqr_s"] >= 0, row
            assert all(_positive(value) for value in row["speedup"][mode].values()), row
        assert _positive(row["model_bytes"]) and _positive(row["bandwidth_bytes_per_s"]), row
        assert _positive(row["fraction_of_copy_bandwidth"]), row
        assert row["peak_extra_bytes"] is None  # no allocator statistics on CPU


def _ok_cases(result, implementation) -> set[str]:
    return {
        row["case"] for row in result["rows"]
        if row["implementation"] == implementation and row["status"] == "ok"
    }


def _fwd_bwd_time(result, case, implementation) -> float:
    (row,) = [
        row for row in result["rows"]
        if row["case"] == case and row["implementation"] == implementation
    ]
    return row["forward_backward"]["median_s"]


def test_loss_baselines_ran_on_every_case(quick_run):
    _, out = quick_run
    result = _result(out, "loss")
    cases = {row["case"] for row in result["rows"]}
    assert cases == {"32x1000", "8x4096", "T4x16x1000"}
    for baseline in ("reference (eager)", "F.kl_div (floor)"):
        assert _ok_cases(result, baseline) == cases, baseline
    for row in result["rows"]:
        if row["status"] == "ok":
            eager = _fwd_bwd_time(result, row["case"], "reference (eager)")
            assert row["speedup"]["forward_backward"]["reference (eager)"] == pytest.approx(
                eager / row["forward_backward"]["median_s"]
            )


def test_lif_reference_ran_once_it_exists(quick_run):
    _, out = quick_run
    result = _result(out, "lif")
    cases = {row["case"] for row in result["rows"]}
    assert cases == {"T4xN16384", "T8xN16384"}
    eager = [row for row in result["rows"] if row["implementation"] == "reference loop (eager)"]
    assert len(eager) == len(cases)
    if hasattr(htakl_kernels.reference, "lif_multistep"):
        assert _ok_cases(result, "reference loop (eager)") == cases
    else:
        assert all("not there yet" in row["note"] for row in eager)


def test_markdown_lists_every_measured_row(quick_run):
    _, out = quick_run
    for suite in ("loss", "lif"):
        result = _result(out, suite)
        text = (out / f"{suite}-quick.md").read_text()
        assert text.startswith(f"# {suite} benchmark on ")
        assert "| case | dtype | implementation |" in text
        ok = [row for row in result["rows"] if row["status"] == "ok"]
        table_lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(table_lines) == 1 + len(ok)
        skipped = {row["implementation"] for row in result["rows"] if row["status"] != "ok"}
        assert all(name in text for name in skipped)


def test_saved_for_backward_counts_residuals_and_rereads():
    x = torch.randn(1000, requires_grad=True)
    # exp saves its output (a residual the forward writes for the backward); x * x saves x.
    exp_saved = measure.saved_for_backward(lambda: x.exp().sum(), (x,))
    assert exp_saved == {"residual_bytes": 4000, "reread_bytes": 0}
    square_saved = measure.saved_for_backward(lambda: (x * x).sum(), (x,))
    assert square_saved == {"residual_bytes": 0, "reread_bytes": 4000}


def test_rotation_count_pushes_inputs_out_of_cache():
    assert measure.rotation_count(bytes_per_call=1 << 20, cache=32 << 20) == 32  # capped
    assert measure.rotation_count(bytes_per_call=16 << 20, cache=32 << 20) == 8
    assert measure.rotation_count(bytes_per_call=1 << 30, cache=32 << 20) == 1


def test_default_output_is_git_ignored_and_never_the_committed_results():
    cpu = torch.device("cpu")
    folder = output_folder(parse_arguments(["--device", "cpu", "--quick"]).out, cpu)
    assert folder == os.path.join("runs", "bench", measure.device_folder_name(cpu))
    with open(os.path.join(ROOT, ".gitignore")) as handle:
        assert "runs/" in handle.read().split()
    # Committed results are written only when --out names their folder.
    committed = os.path.join("bench", "results", measure.device_folder_name(cpu))
    assert output_folder(parse_arguments(["--device", "cpu", "--out", committed]).out, cpu) == committed


def test_shapes_choose_the_cases_of_a_suite():
    cpu = torch.device("cpu")
    arguments = parse_arguments(["--device", "cpu", "--suite", "loss", "--shapes", "8x1025,T4x3x7"])
    assert arguments.chosen_shapes == [(None, 8, 1025), (4, 3, 7)]
    chosen = loss_suite.cases(cpu, [torch.float32], False, arguments.chosen_shapes)
    assert [case.label for case in chosen] == ["8x1025", "T4x3x7"]
    assert chosen[1].model_bytes == (2 * 4 + 1) * 3 * 7 * 4  # SPEC 4: (2T + 1) E b
    arguments = parse_arguments(["--device", "cpu", "--suite", "lif", "--shapes", "T8xN4096"])
    assert [case.label for case in lif_suite.cases(cpu, [torch.float32], False,
                                                   arguments.chosen_shapes)] == ["T8xN4096"]


@pytest.mark.parametrize("argv", [
    ["--suite", "loss", "--shapes", "T8xN4096"],   # a LIF label for the loss suite
    ["--suite", "lif", "--shapes", "8x1000"],
    ["--suite", "loss", "--shapes", "0x1000"],
    ["--suite", "all", "--shapes", "8x1000"],       # shapes belong to one suite
    ["--suite", "loss", "--implementations", " , "],
])
def test_bad_shapes_or_implementations_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--device", "cpu", *argv])
    assert "--shapes" in capsys.readouterr().err or "--implementations" in argv


def test_implementations_filter_by_name_part():
    cpu = torch.device("cpu")
    found = loss_suite.implementations(cpu, quick=True)
    parts = parse_arguments(["--device", "cpu", "--implementations", "HTAKL,f.kl_div"]).implementation_parts
    kept = [implementation.name for implementation in chosen_implementations(found, parts)]
    assert "F.kl_div (floor)" in kept and "reference (eager)" not in kept
    assert kept and all(name.startswith("htakl ") or name == "F.kl_div (floor)" for name in kept)


def test_profiler_device_time_sums_the_events_of_one_device():
    """measure.device_microseconds, the sum behind the GPU-time column, on CPU events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        torch.randn(256, 256) @ torch.randn(256, 256)
    events = profile.events()
    cpu_us = measure.device_microseconds(events, torch.autograd.DeviceType.CPU)
    assert cpu_us > 0
    assert cpu_us == pytest.approx(sum(e.time_range.elapsed_us() for e in events))
    assert measure.device_microseconds(events, torch.autograd.DeviceType.CUDA) == 0


def test_table_shows_gpu_time_only_where_measured():
    from bench import report
    row = {"status": "ok", "role": "ours", "implementation": "htakl cuda", "case": "8x1000",
           "dtype": "float32", "forward_backward": {"median_s": 2e-3, "iqr_s": 1e-4},
           "forward": {"median_s": 1e-3, "iqr_s": 1e-4}, "bandwidth_bytes_per_s": 1e9,
           "fraction_of_copy_bandwidth": 0.1, "saved_for_backward": None,
           "peak_extra_bytes": None, "speedup": {"forward_backward": {}}, "elements": 8000}
    header, cells = report.table([row])
    assert "GPU ms" not in header
    header, cells = report.table([dict(row, forward_backward_device_s=5e-4,
                                       device_fraction_of_copy_bandwidth=0.4)])
    column = header.index("GPU ms")
    assert cells[0][column] == "0.5" and cells[0][header.index("GPU % of copy")] == "40"
