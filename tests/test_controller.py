"""The convergence-aware communication controller: signals, policy shape, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emo_mqtt.controller import (
    ControlDecision,
    ControllerConfig,
    ConvergenceController,
    SendEverything,
    activation_drift,
    relative_improvement,
    select_for_publish,
)
from emo_mqtt.errors import ConfigError


def test_activation_drift() -> None:
    a = np.ones((4, 8))
    assert activation_drift(a, a) == 0.0
    assert activation_drift(a, 1.1 * a) == pytest.approx(0.1)
    assert activation_drift(np.zeros(3), np.ones(3)) > 1e6  # guarded, not a ZeroDivisionError
    with pytest.raises(ConfigError):
        activation_drift(np.ones(3), np.ones(4))


def test_relative_improvement() -> None:
    assert relative_improvement([1.0, 1.0, 1.0], window=2) is None
    assert relative_improvement([2.0, 2.0, 1.0, 1.0], window=2) == pytest.approx(0.5)
    assert relative_improvement([1.0, 1.0, 1.0, 1.0], window=2) == 0.0
    assert relative_improvement([1.0, 1.0, 2.0, 2.0], window=2) == pytest.approx(-1.0)
    # non-finite values are skipped: windows (5, 2) and (2, 1)
    assert relative_improvement([5.0, float("nan"), 2.0, 2.0, 1.0], window=2) == pytest.approx(
        2.0 / 3.5
    )


def controller(**kw: float) -> ConvergenceController:
    """A controller with the full range of shares and the fp16 step in play (the mechanism
    under test; the shipped defaults cap the share at 0.5 and stay at int8 longer)."""
    kw = {"max_fraction": 1.0, "precision_budget": 0.2, **kw}
    return ConvergenceController(ControllerConfig(**kw))  # type: ignore[arg-type]


def test_warmup_sends_everything() -> None:
    c = controller(warmup_rounds=3)
    for r in range(3):
        d = c.decide("dev-0", r)
        assert (d.fraction, d.interval, d.reason) == (1.0, 1, "warmup")
        assert d.precision == ControllerConfig().warmup_precision
        c.observe_round(r, drift=0.01, fl_loss=1.0)
    assert c.decide("dev-0", 3).reason != "warmup"


def test_decisions_use_only_earlier_rounds() -> None:
    c = controller(warmup_rounds=0)
    c.observe_round(4, drift=0.5, fl_loss=None)
    assert c.decide("d", 4).reason == "warmup"  # round 4's drift is known only after it
    assert c.decide("d", 5).share == pytest.approx(1.0)


def share_at(drift: float, **kw: float) -> float:
    c = controller(warmup_rounds=0, **kw)
    c.observe_round(0, drift=drift, fl_loss=None)
    return c.decide("d", 1).share


def test_share_tracks_drift_with_floor_and_ceiling() -> None:
    drifts = [0.001, 0.01, 0.03, 0.05, 0.1, 0.2, 0.25, 0.5, 2.0]
    shares = [share_at(d) for d in drifts]
    assert shares == sorted(shares)
    cfg = ControllerConfig()
    # coverage floor: with max_staleness 3, 1 - 0.5 ** (1/4) keeps half the samples fresh
    assert cfg.floor == pytest.approx(1 - 0.5**0.25)
    assert shares[0] == pytest.approx(cfg.floor)
    assert share_at(0.1) == pytest.approx(0.1 / cfg.staleness_budget)
    assert shares[-1] == pytest.approx(1.0)  # max_fraction
    assert share_at(0.0001, min_coverage=0.0, min_fraction=0.2) == pytest.approx(0.2)


def test_precision_follows_the_error_budget() -> None:
    """Quantisation error must stay small next to drift: cheaper precision when drift is big."""
    c = controller(warmup_rounds=0)
    seen = []
    for r, drift in enumerate([0.5, 0.06, 0.02, 0.001]):
        c.observe_round(r, drift, None)
        seen.append(c.decide("d", r + 1).precision)
    assert seen == ["int8", "int8", "fp16", "fp32"]


def test_fast_fl_progress_keeps_rate_high() -> None:
    slow, fast = controller(warmup_rounds=0), controller(warmup_rounds=0)
    for r, (ls, lf) in enumerate(zip([1.0, 1.0, 0.99, 0.99], [1.0, 1.0, 0.5, 0.4], strict=True)):
        slow.observe_round(r, drift=0.04, fl_loss=ls)
        fast.observe_round(r, drift=0.04, fl_loss=lf)
    assert fast.decide("d", 4).share > slow.decide("d", 4).share
    assert fast.decide("d", 4).share == pytest.approx(1.0)
    assert "fl_gain" in fast.decide("d", 4).reason


def test_overlay_plateau_cuts_its_devices_only() -> None:
    c = controller(warmup_rounds=0, overlay_window=2, plateau_factor=0.5)
    c.assign("d0", "ov-0")
    c.assign("d1", "ov-1")
    for r in range(4):
        c.observe_round(r, drift=0.15, fl_loss=None)
        c.observe_overlay("ov-0", r, 0.5)  # flat: plateau
        c.observe_overlay("ov-1", r, 1.0 / (r + 1))  # still learning
    base = share_at(0.15)
    assert c.decide("d0", 4).share == pytest.approx(base * 0.5)
    assert "plateau" in c.decide("d0", 4).reason
    assert c.decide("d1", 4).share == pytest.approx(base)
    # a device with no assigned overlay is cut only when all overlays plateau
    assert c.decide("d-unknown", 4).share == pytest.approx(base)
    # ... and never below the floor
    for r in range(4, 8):
        c.observe_round(r, drift=0.001, fl_loss=None)
        c.observe_overlay("ov-0", r, 0.5)
    assert c.decide("d0", 8).share == pytest.approx(ControllerConfig().floor)


def test_shipped_defaults_cap_the_share_and_keep_int8() -> None:
    """The defaults tuned on validation (docs/algorithms.md section 6): at most half of the
    samples per round, int8 while drift is above int8's own error."""
    c = ConvergenceController()
    assert c.decide("d", 0) == ControlDecision(0.5, "int8", 1, "warmup")
    for r, drift in enumerate([0.6, 0.3, 0.05, 0.02]):
        c.observe_round(r, drift, None)
    late = c.decide("d", 4)
    assert late.precision == "int8" and late.share == pytest.approx(ControllerConfig().floor)
    c.observe_round(4, 0.005, None)
    assert c.decide("d", 5).precision == "fp16"


def test_interval_for_small_shares() -> None:
    d = ConvergenceController(ControllerConfig(warmup_rounds=0, min_batch_share=0.25))
    d.observe_round(0, drift=0.001, fl_loss=None)
    dec = d.decide("x", 1)
    assert dec.interval > 1 and dec.fraction >= 0.25 - 1e-9
    assert dec.share == pytest.approx(ControllerConfig().floor)


def test_deterministic_and_json_round_trip() -> None:
    def run() -> list[ControlDecision]:
        c = controller()
        out = []
        for r in range(8):
            c.observe_round(r, drift=1.0 / (r + 1), fl_loss=2.0 / (r + 1))
            c.observe_overlay("ov", r, 1.0 / (r + 2))
            out.append(c.decide("dev", r + 1))
        return out

    first = run()
    assert first == run()
    for d in first:
        assert ControlDecision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    with pytest.raises(ConfigError):
        ControlDecision.from_dict({"fraction": 0.5})


def test_send_everything() -> None:
    s = SendEverything()
    s.observe_round(3, 0.0001, 0.1)
    s.observe_overlay("ov", 3, 0.01)
    assert s.decide("d", 99) == ControlDecision(1.0, "fp32", 1, "send-everything")


def test_decision_and_config_validation() -> None:
    with pytest.raises(ConfigError):
        ControlDecision(1.5, "fp32", 1, "")
    with pytest.raises(ConfigError):
        ControlDecision(0.5, "fp8", 1, "")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ControlDecision(0.5, "fp32", 0, "")
    with pytest.raises(ConfigError):
        ControllerConfig(min_fraction=0.0)
    with pytest.raises(ConfigError):
        ControllerConfig(staleness_budget=0.0)
    with pytest.raises(ConfigError):
        ControllerConfig(min_coverage=1.0)


def test_select_for_publish_rate() -> None:
    rng = np.random.default_rng(0)
    dec = ControlDecision(0.3, "fp16", 2, "")
    picked = [select_for_publish(dec, b, 32, rng) for b in range(2000)]
    assert all(p.size == 0 for p in picked[1::2])  # every 2nd batch only
    rate = sum(p.size for p in picked) / (2000 * 32)
    assert rate == pytest.approx(0.15, abs=0.01)
    assert all(np.all(np.diff(p) > 0) and (p.size == 0 or p.max() < 32) for p in picked)
    full = select_for_publish(ControlDecision(1.0, "fp32", 1, ""), 0, 7, rng)
    assert full.tolist() == list(range(7))


def test_state_survives_a_json_round_trip() -> None:
    """A resumed server's controller decides exactly as the one it replaces would have."""
    from emo_mqtt.controller import ConvergenceController

    a = ConvergenceController()
    a.assign("d0", "o0")
    for r, (drift, loss) in enumerate([(None, 2.0), (0.3, 1.5), (0.1, 1.2), (0.04, 1.1)], 1):
        a.observe_round(r, drift, loss)
        a.observe_overlay("o0", r, 1.0 / r)
    b = ConvergenceController()
    b.assign("d0", "o0")
    b.restore(json.loads(json.dumps(a.state())))
    assert b.state() == a.state()
    for r in range(1, 6):
        assert b.decide("d0", r) == a.decide("d0", r)
