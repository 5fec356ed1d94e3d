"""Mean ± sample std over the seeds of ``emo run --seeds`` (issue 13 item 9): pure maths."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from emo_mqtt.aggregate_seeds import aggregate, flatten_numbers, mean_std, pm, seeds_table, stats
from emo_mqtt.report import write_report


def test_std_is_the_sample_std() -> None:
    values = [0.61, 0.65, 0.70]
    mean, std, n = mean_std(values)
    assert n == 3
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))  # ddof=1, not pstdev
    assert std != pytest.approx(statistics.pstdev(values))


def test_nulls_are_kept_in_values_and_left_out_of_mean_and_std() -> None:
    figure = stats([1.0, None, 3.0])
    assert figure["values"] == [1.0, None, 3.0]
    assert figure["n"] == 2
    assert figure["mean"] == 2.0
    assert figure["std"] == pytest.approx(math.sqrt(2.0))


def test_one_value_has_no_std_and_none_has_no_mean() -> None:
    assert stats([None, 5.0]) == {"mean": 5.0, "std": None, "n": 1, "values": [None, 5.0]}
    assert stats([None, None]) == {"mean": None, "std": None, "n": 0, "values": [None, None]}


def test_booleans_average_as_the_fraction_that_held() -> None:
    figure = stats([True, False, True, True])
    assert figure["mean"] == 0.75 and figure["values"] == [True, False, True, True]


def test_nested_numbers_are_flattened_and_lists_and_strings_left_out() -> None:
    entry = {
        "accuracy": 0.5,
        "bytes_by_kind": {"activations": 10, "weights": 20},
        "accuracy_per_round": [0.1, 0.5],
        "fl_model_sha256": "ab",
        "time_to_target_s": None,
        "nan": float("nan"),
    }
    assert flatten_numbers(entry) == {
        "accuracy": 0.5,
        "bytes_by_kind.activations": 10,
        "bytes_by_kind.weights": 20,
        "time_to_target_s": None,
    }


def _summary(acc_fl: float, acc_emo: float | None, **extra: Any) -> dict[str, Any]:
    algorithms: dict[str, Any] = {"fl": {"accuracy": acc_fl, "bytes_by_kind": {"weights": 100}}}
    comparisons: dict[str, Any] = dict(extra)
    if acc_emo is not None:
        algorithms["emo"] = {"accuracy": acc_emo, "bytes_by_kind": {"activations": 7}}
        comparisons["emo_minus_fl_points"] = round(100 * (acc_emo - acc_fl), 2)
    return {"algorithms": algorithms, "comparisons": comparisons}


def test_every_key_is_aggregated_without_a_list_of_names() -> None:
    """A comparison only some seeds have (a key added later, an algorithm not run in one
    seed) is aggregated with a null for the others."""
    runs = {
        1: _summary(0.6, 0.7, brand_new_ratio=2.0),
        2: _summary(0.5, None),
        3: _summary(0.7, 0.8, brand_new_ratio=4.0),
    }
    agg = aggregate(runs)
    assert agg["seeds"] == [1, 2, 3]
    assert list(agg["algorithms"]) == ["fl", "emo"]
    assert agg["algorithms"]["fl"]["accuracy"]["mean"] == pytest.approx(0.6)
    assert agg["algorithms"]["fl"]["accuracy"]["std"] == pytest.approx(0.1)
    emo = agg["algorithms"]["emo"]
    assert emo["accuracy"]["values"] == [0.7, None, 0.8]
    assert emo["accuracy"]["mean"] == pytest.approx(0.75)
    assert emo["bytes_by_kind.activations"]["values"] == [7, None, 7]
    new = agg["comparisons"]["brand_new_ratio"]
    assert new["values"] == [2.0, None, 4.0] and new["mean"] == 3.0
    assert agg["comparisons"]["emo_minus_fl_points"]["values"] == [10.0, None, 10.0]


def test_mean_and_std_formatting() -> None:
    assert pm(stats([0.5, 0.7])) == f"0.6000 ± {statistics.stdev([0.5, 0.7]):.4f}"
    assert pm(stats([2e6, None]), scale=1e6, digits=2) == "2.00 (1 null)"
    assert pm(stats([None])) == "-"
    assert pm(None) == "-"


def test_the_printed_table_has_a_row_per_algorithm() -> None:
    agg = aggregate({1: _summary(0.6, 0.7), 2: _summary(0.5, 0.9)})
    lines = seeds_table(agg).splitlines()
    assert lines[0].split()[:2] == ["algorithm", "accuracy"]
    assert lines[1].startswith("fl ") and "0.5500 ± 0.0707" in lines[1]
    assert lines[2].startswith("emo ") and "0.8000 ± 0.1414" in lines[2]


def test_the_report_of_a_seeds_directory_is_a_mean_std_table(tmp_path: Path) -> None:
    agg = aggregate({1: _summary(0.6, 0.7), 2: _summary(0.5, 0.9)})
    summary = {
        "scenario": "x.toml",
        "state": "interrupted",
        "interrupted": {"seed": 2, "algorithm": "emo", "last_round": 1},
        "config": {"run": {"name": "x"}},
        "runs": {"1": {"state": "finished", "run_id": "x-1-s1", "dir": "seed-1"}},
        **agg,
    }
    written = write_report(summary, tmp_path)
    assert written == [tmp_path / "report.md"]
    report = written[0].read_text()
    assert "| fl | 0.5500 ± 0.0707 |" in report
    assert "(`emo_minus_fl_points`): 25.0000 ± 21.2132 (values 10, 40)" in report
    assert "[seed-1/report.md](seed-1/report.md)" in report
    assert "during seed 2 (emo, round 1)" in report
