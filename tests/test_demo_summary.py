"""The demo's statistics over seeds (htakl_kernels.demo.summary) on hand-made numbers."""

from __future__ import annotations

import math

import pytest

from htakl_kernels.demo.summary import format_table, mean_std, summarise


def test_mean_std_is_the_sample_standard_deviation():
    statistic = mean_std([1, 2, 3, 4])
    assert statistic["mean"] == 2.5
    # Squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3.
    assert statistic["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert statistic["values"] == [1.0, 2.0, 3.0, 4.0]
    assert mean_std([0.5, 0.5, 0.5])["std"] == 0.0


def test_mean_std_of_one_value_has_no_std_and_of_none_is_refused():
    assert mean_std([0.75]) == {"mean": 0.75, "std": None, "values": [0.75]}
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def _run(accuracy: float, firing_rates: dict[str, float], energy: float) -> dict:
    rates = list(firing_rates.values())
    return {
        "test_accuracy": accuracy, "firing_rates": firing_rates,
        "overall_firing_rate": sum(rates) / len(rates) if rates else 0.0,
        "energy_uj_per_image": energy, "synaptic_ops_per_image": 1e6 * energy,
        "macs_per_image": 2e4, "loss_seconds": 0.5, "loss_ms_per_step": 1.25,
    }


def _record(seed: int, ce: float, kl: float, htakl: float) -> dict:
    rates = {"body.0": 0.1 * (seed + 1), "body.2": 0.05}
    return {
        "seed": seed,
        "teacher": _run(0.99, {}, 3.0),
        "students": {
            "ce": _run(ce, rates, 0.5 + seed), "kl": _run(kl, rates, 0.6), "htakl": _run(htakl, rates, 0.7),
        },
    }


SEED_RUNS = [_record(0, ce=0.90, kl=0.92, htakl=0.95), _record(1, ce=0.94, kl=0.92, htakl=0.97)]


def test_summarise_means_stds_and_paired_differences():
    summary = summarise(SEED_RUNS)
    assert summary["seeds"] == [0, 1]
    ce = summary["students"]["ce"]
    # Two values a, b: mean (a + b) / 2, sample std |a - b| / sqrt(2).
    assert ce["test_accuracy"]["mean"] == pytest.approx(0.92)
    assert ce["test_accuracy"]["std"] == pytest.approx(0.04 / math.sqrt(2))
    assert ce["energy_uj_per_image"]["mean"] == pytest.approx(1.0)
    assert ce["energy_uj_per_image"]["std"] == pytest.approx(1 / math.sqrt(2))
    assert ce["firing_rates"]["body.0"]["values"] == pytest.approx([0.1, 0.2])
    assert ce["firing_rates"]["body.2"]["std"] == 0.0
    assert ce["overall_firing_rate"]["mean"] == pytest.approx((0.075 + 0.125) / 2)
    assert summary["students"]["kl"]["test_accuracy"]["std"] == pytest.approx(0.0, abs=1e-15)
    assert summary["teacher"]["firing_rates"] == {}
    differences = summary["accuracy_differences"]
    assert set(differences) == {"kl-ce", "htakl-ce", "htakl-kl"}
    # Paired per seed: htakl - ce = 0.05 and 0.03; kl - ce = 0.02 and -0.02.
    assert differences["htakl-ce"]["values"] == pytest.approx([0.05, 0.03])
    assert differences["htakl-ce"]["mean"] == pytest.approx(0.04)
    assert differences["htakl-ce"]["std"] == pytest.approx(0.02 / math.sqrt(2))
    assert differences["kl-ce"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_summarise_refuses_no_seeds():
    with pytest.raises(ValueError, match="at least one seed"):
        summarise([])


def test_table_prints_mean_std_and_flags_differences_within_noise():
    table = format_table(summarise(SEED_RUNS))
    lines = table.splitlines()
    (ce_line,) = [line for line in lines if line.startswith("CE only")]
    assert "92.00 ± 2.83 %" in ce_line and "1.000 ± 0.707 uJ" in ce_line
    assert "10.00 ± 3.54 %" in ce_line  # overall firing rate 7.5 % and 12.5 %
    assert "mean ± std over 2 seeds (0, 1)" in table
    (htakl_ce,) = [line for line in lines if "CE + HTA-KL - CE only" in line]
    assert "+4.00 ± 1.41 points" in htakl_ce and "within noise" not in htakl_ce
    (kl_ce,) = [line for line in lines if "CE + KL - CE only" in line]
    assert "+0.00 ± 2.83 points" in kl_ce and "within noise" in kl_ce


def test_table_of_one_seed_has_no_std_and_no_differences():
    table = format_table(summarise(SEED_RUNS[:1]))
    (ce_line,) = [line for line in table.splitlines() if line.startswith("CE only")]
    assert "90.00 %" in ce_line and "±" not in table
    assert "differences" not in table
