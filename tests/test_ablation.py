"""Issue 13: the controller's ablations, horizontal scaling by fleet-wide replay, and the
spill tier in use. Strategies, comparisons maths and caches alone (plus one small fleet on
the in-memory bus); no broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.bus import MemoryBroker
from emo_mqtt.cache import ReplayCache, SpillTier
from emo_mqtt.config import from_dict, load_config
from emo_mqtt.controller import ControlDecision, ConvergenceController, FixedRule, SendEverything
from emo_mqtt.dataplan import plan_data
from emo_mqtt.errors import ConfigError
from emo_mqtt.fleet import (
    best_fixed_rule,
    comparisons,
    overlay_cache_totals,
    run_algorithm,
)
from emo_mqtt.messages import Activations, Control
from emo_mqtt.models import build_fl_model
from emo_mqtt.provision import acl_text
from emo_mqtt.strategies.overlay import OverlayStrategy
from emo_mqtt.strategies.server import ServerStrategy, control_policy
from emo_mqtt.topics import Kind

ROOT = Path(__file__).resolve().parents[1]

SMALL: dict[str, Any] = {
    "run": {"name": "abl", "rounds": 2},
    "data": {"samples_per_device": 150, "validation_samples": 300, "eval_samples_per_round": 300},
    "fleet": {"devices": 4, "overlays": 2, "min_updates": 4, "round_deadline_s": 30},
    "emo": {"overlay_steps_per_round": 3, "overlay_batch_size": 16, "cache_entries": 1000},
}


# -- the ablations ------------------------------------------------------------------------------


def test_the_ablations_are_emo_without_a_signal() -> None:
    for algorithm in (Algorithm.EMO_INT8, Algorithm.EMO_FIXED):
        assert algorithm.uses_overlays and algorithm.fixed_rule
        assert not algorithm.controlled and not algorithm.sends_everything
    assert not Algorithm.EMO.fixed_rule and not Algorithm.EMO_ALL.fixed_rule


def test_fixed_rules_ignore_every_signal() -> None:
    rule = FixedRule(0.5, "int8")
    before = rule.decide("dev00", 1)
    rule.observe_round(1, 0.9, 2.0)
    rule.observe_overlay("ovl0", 1, 0.1)
    after = rule.decide("dev03", 9)
    assert before == after and after.share == 0.5 and after.precision == "int8"
    assert after.interval == 1
    with pytest.raises(ConfigError):
        FixedRule(1.5, "int8")
    with pytest.raises(ConfigError):
        FixedRule(0.5, "int4")  # type: ignore[arg-type]


def test_control_policy_by_algorithm() -> None:
    config = from_dict({**SMALL, "controller": {"fixed_share": 0.25, "fixed_precision": "fp16"}})
    int8 = control_policy(config, Algorithm.EMO_INT8).decide("dev00", 5)
    assert (int8.share, int8.precision) == (1.0, "int8")
    fixed = control_policy(config, Algorithm.EMO_FIXED).decide("dev00", 5)
    assert (fixed.share, fixed.precision) == (0.25, "fp16")
    assert isinstance(control_policy(config, Algorithm.EMO), ConvergenceController)
    assert isinstance(control_policy(config, Algorithm.EMO_ALL), SendEverything)
    off = config.with_overrides(controller={"enabled": False})
    assert isinstance(control_policy(off, Algorithm.EMO), SendEverything)


def test_server_publishes_the_fixed_rule_every_round() -> None:
    config = from_dict(SMALL)
    plan = plan_data(config)
    s = ServerStrategy(config, Algorithm.EMO_FIXED, plan)
    out = s.start_round(3, now=0.0)
    controls = [o.message for o in out if o.kind is Kind.CONTROL]
    assert len(controls) == 4
    for msg in controls:
        assert isinstance(msg, Control) and msg.round == 3
        assert msg.decision == ControlDecision(0.5, "int8", 1, msg.decision.reason)
    assert [d["fraction"] for d in s.decisions] == [0.5] * 4


@pytest.mark.parametrize(
    ("values", "problem"),
    [({"fixed_share": 0.0}, "fixed_share"), ({"fixed_precision": "int4"}, "fixed_precision")],
)
def test_bad_fixed_rule_is_refused(values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        from_dict({**SMALL, "controller": values})


def _entry(accuracy: float, activation_mb: float) -> dict[str, Any]:
    act = int(activation_mb * 1e6)
    return {
        "accuracy": accuracy,
        "bytes": act + 1000,
        "bytes_by_kind": {"activations": act, "update": 1000},
        "fl_model_sha256": "x",
        "sim_time_s": 1.0,
        "time_to_target_s": None,
        "accuracy_per_round": [accuracy],
        "time_per_round_s": [1.0],
    }


def test_controller_vs_best_fixed_rule_maths() -> None:
    algos = {
        "emo": _entry(0.8648, 109.5),
        "emo_all": _entry(0.8700, 700.0),
        "emo_int8": _entry(0.8642, 187.7),
        "emo_fixed": _entry(0.8660, 93.8),
    }
    out = comparisons(algos)
    assert out["best_fixed_rule"] == "emo_fixed"
    assert out["controller_vs_best_fixed_bytes"] == pytest.approx(109.5 / 93.8, abs=1e-4)
    assert out["controller_vs_best_fixed_points"] == pytest.approx(-0.12)
    # A tie in accuracy: the rule that sends fewer bytes is the stronger one.
    tie = {**algos, "emo_int8": _entry(0.8660, 50.0)}
    assert best_fixed_rule(tie) == "emo_int8"
    # Only what ran is compared; nothing without emo or without a fixed rule.
    assert best_fixed_rule({"emo": algos["emo"]}) is None
    assert "best_fixed_rule" not in comparisons({"emo": algos["emo"], "emo_all": algos["emo_all"]})
    assert "best_fixed_rule" not in comparisons({"emo_int8": algos["emo_int8"]})


def test_ablation_scenario_runs_the_controller_and_both_rules() -> None:
    """The shipped fixed rule is the one tuned on validation (docs/algorithms.md section 6),
    which docs/results.md's ablation figures were measured with; the controller keeps its
    defaults (nothing in the scenario tunes it for the ablation)."""
    config = load_config(ROOT / "scenarios" / "ablation.toml")
    assert set(config.run.algorithms) == {"emo", "emo_all", "emo_int8", "emo_fixed"}
    assert (config.controller.fixed_share, config.controller.fixed_precision) == (0.15, "int8")
    assert config.controller.policy_overrides == ()


# -- horizontal scaling: every overlay replays the whole fleet --------------------------------


def test_fleet_replay_scope_gives_every_overlay_every_device() -> None:
    own = from_dict(SMALL)
    fleet = own.with_overrides(emo={"replay_scope": "fleet"})
    assert own.replays_of("ovl0") == ["dev00", "dev02"]
    assert fleet.replays_of("ovl0") == fleet.replays_of("ovl1") == fleet.device_ids()
    assert OverlayStrategy(fleet, "ovl1", spill=None).devices == fleet.device_ids()
    # The controller's plateau signal still follows the serving overlay.
    assert fleet.overlay_of("dev01") == "ovl1"
    acl = acl_text(4, 2, "r", fleet_replay=True)
    block = acl.split("user overlay-ovl1\n")[1].split("\n\n")[0]
    assert all(f"topic read emo/r/device/dev0{i}/activations" in block for i in range(4))
    own_block = acl_text(4, 2, "r").split("user overlay-ovl1\n")[1].split("\n\n")[0]
    assert "dev00/activations" not in own_block and "dev01/activations" in own_block


def test_with_fleet_replay_each_overlay_caches_every_devices_activations() -> None:
    """One small fleet on the in-memory bus: the broker fans each device's activations out to
    both overlays, so the overlays together are offered twice what the devices sent."""
    config = from_dict(
        {
            **SMALL,
            "run": {**SMALL["run"], "rounds": 1},
            "data": {**SMALL["data"], "samples_per_device": 64},
            "emo": {**SMALL["emo"], "replay_scope": "fleet"},
        }
    )
    plan = plan_data(config)
    entry = asyncio.run(run_algorithm(MemoryBroker(), config, "emo_int8", plan, say=lambda _: None))
    sent = sum(len(plan.device(d)) for d in config.device_ids())
    epochs, rounds = config.fl.local_epochs, config.run.rounds
    # emo_int8: every sample of every epoch of every round, to both overlays.
    assert entry["overlay_cache"]["offered"] == 2 * sent * epochs * rounds
    assert set(entry["member_accuracy"]) == {"fl", "ovl0", "ovl1"}


def test_scaling_scenario_replays_fleet_wide() -> None:
    config = load_config(ROOT / "scenarios" / "scaling.toml")
    assert config.emo.replay_scope == "fleet" and "emo" in config.run.algorithms


# -- the spill tier ------------------------------------------------------------------------------


def test_overlay_cache_totals_sum_the_overlays_only() -> None:
    final = {
        "overlay/ovl0": {"cache_stats": {"offered": 10, "spilled": 4}, "spill_entries_written": 4},
        "overlay/ovl1": {"cache_stats": {"offered": 5}, "spill_entries_taken": 2},
        "device/dev00": {"cache_stats": {"offered": 99}, "spill_entries_written": 99},
    }
    totals = overlay_cache_totals(final)
    assert totals["offered"] == 15 and totals["spilled"] == 4
    assert totals["spill_entries_written"] == 4 and totals["spill_entries_taken"] == 2
    assert overlay_cache_totals({})["spill_entries_written"] == 0


def test_rotate_cycles_through_the_spill_tier(tmp_path: Path) -> None:
    cache = ReplayCache(10, (3,), spill=SpillTier(tmp_path, 2**20))
    acts = np.arange(75, dtype=np.float32).reshape(25, 3)
    cache.put("dev00", np.arange(25), acts, np.arange(25) % 10, 1)
    assert len(cache) == 10 and cache.spill is not None
    assert cache.spill.stats.entries_written == 15
    seen = {k[1] for k in cache._slot}
    for _ in range(3):
        assert cache.rotate(2, 3, 5) == 5
        assert len(cache) == 10
        seen |= {k[1] for k in cache._slot}
    # Three rotations of 5: every sample has been in the cache at some point.
    assert seen == set(range(25))
    assert cache.spill.stats.entries_taken == 15
    # Nothing fresh left on disk: no rotation, no change.
    assert cache.rotate(9, 3, 5) == 0


def test_spill_scenario_overflows_its_caches(tmp_path: Path) -> None:
    """scenarios/spill.toml: what one round of its devices sends does not fit the cache, so the
    overlay spills it, and the next round's replay reads some of it back."""
    config = load_config(ROOT / "scenarios" / "spill.toml")
    assert config.emo.spill_mib > 0
    plan = plan_data(config)
    overlay = OverlayStrategy(config, "ovl0", SpillTier(tmp_path, config.emo.spill_mib * 2**20))
    held = sum(len(plan.device(d)) for d in overlay.devices)
    assert held > config.emo.cache_entries  # overflows even at the controller's floor share
    shape = build_fl_model(config.fl.model).activation_shape
    for device in overlay.devices:
        n = len(plan.device(device))
        data = np.ones((n, *shape), np.float32)
        overlay.store(device, Activations(1, np.arange(n), np.arange(n) % 10, data, None, True))
    spill = overlay.cache.spill
    assert spill is not None
    assert spill.stats.entries_written == held - config.emo.cache_entries
    assert overlay.replay_batches(2)
    assert spill.stats.entries_taken == config.emo.cache_entries // 2
