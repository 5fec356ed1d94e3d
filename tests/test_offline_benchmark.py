"""benchmarks/offline_emo.py, the tuning tool behind docs/algorithms.md: it must never see
test data, must run the fleet's own code, and its combiners must fit what they claim."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import offline_emo

from emo_mqtt.config import RunConfig, load_config
from emo_mqtt.dataplan import plan_data

ROOT = Path(__file__).resolve().parents[1]


def _tiny() -> RunConfig:
    return load_config(ROOT / "scenarios" / "quickstart.toml").with_overrides(
        run={"rounds": 1, "algorithms": ["emo"]},
        data={"samples_per_device": 100, "validation_samples": 200, "eval_samples_per_round": 100},
        fleet={"devices": 2, "overlays": 1, "min_updates": 2, "round_deadline_s": 600.0},
        emo={"overlay_steps_per_round": 5},
    )


def test_tuning_plan_scores_on_half_of_validation_never_on_test() -> None:
    config = _tiny()
    full = plan_data(config)
    plan = offline_emo.tuning_plan(config)
    half = len(full.validation) // 2
    np.testing.assert_array_equal(plan.validation.x, full.validation.x[:half])
    np.testing.assert_array_equal(plan.test.x, full.validation.x[half:])
    np.testing.assert_array_equal(plan.eval_subset.y, full.validation.y[half:])
    assert len(plan.test) == len(full.validation) - half


def test_unshaped_drops_only_the_network_section() -> None:
    paper = load_config(ROOT / "scenarios" / "paper.toml")
    assert paper.network.enabled
    bare = offline_emo.unshaped(paper)
    assert not bare.network.enabled
    assert bare.sfl == paper.sfl and bare.fleet == paper.fleet and bare.emo == paper.emo


def test_richer_combiners_fit_held_out_data() -> None:
    rng = np.random.default_rng(0)

    def members(n: int) -> tuple[list[np.ndarray], np.ndarray]:
        y = rng.integers(0, 10, n)
        out = []
        for signal in (2.5, 0.5):  # one informative member, one nearly noise
            z = rng.normal(size=(n, 10))
            z[np.arange(n), y] += signal
            p = np.exp(z)
            out.append(p / p.sum(1, keepdims=True))
        return out, y

    fit, y_fit = members(2000)
    held, y_held = members(2000)
    alone = float(np.mean(held[0].argmax(1) == y_held))
    for name, predict in offline_emo.richer_combiners(fit, y_fit).items():
        scores = predict(held)
        assert scores.shape == (2000, 10), name
        # At least as good as the informative member alone, within sampling noise.
        assert float(np.mean(scores.argmax(1) == y_held)) > alone - 0.03, name


def test_one_runs_the_fleet_and_refits_its_ensemble(tmp_path: Path) -> None:
    config = _tiny()
    plan = offline_emo.tuning_plan(config)
    result = offline_emo.one(config, "emo", plan)
    pooled = result["pooling_val_accuracy"]
    assert set(pooled) == {"log+bias", "log", "linear", "classwise", "stacked"}
    # The shipped pooling, re-fitted on the same data, is the run's own figure.
    assert pooled["log+bias"] == result["val_accuracy"]
    assert 0.0 <= result["fl_calibrated_val_accuracy"] <= 1.0
    assert offline_emo.poolings(tmp_path / "missing.npz", plan) is None
