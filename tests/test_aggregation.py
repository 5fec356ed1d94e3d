"""Aggregation one device cannot poison: robust aggregators, weight caps, the norm reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_mqtt.config import from_dict
from emo_mqtt.errors import ConfigError, UpdateRejected
from emo_mqtt.fedavg import (
    AGGREGATORS,
    NormReference,
    RoundCollector,
    aggregate,
    coordinate_median,
    fedavg,
    state_norm,
    trimmed_mean,
)

State = dict[str, np.ndarray]


def honest(n: int, seed: int = 0) -> list[tuple[str, State, int]]:
    """``n`` honest updates scattered around 1.0 (and an integer counter)."""
    rng = np.random.default_rng(seed)
    return [
        (
            f"dev{i:02d}",
            {
                "w": rng.normal(1.0, 0.1, size=(3, 4)).astype(np.float32),
                "steps": np.array(10 + i, dtype=np.int64),
            },
            100,
        )
        for i in range(n)
    ]


def poison(value: float, samples: int = 100) -> tuple[str, State, int]:
    return (
        "dev99",
        {"w": np.full((3, 4), value, dtype=np.float32), "steps": np.array(0, dtype=np.int64)},
        samples,
    )


def test_median_and_trimmed_mean_of_known_values() -> None:
    ups = [(f"d{i}", {"w": np.array([v, -v], np.float32)}, 1) for i, v in enumerate([1, 2, 3, 10])]
    assert np.allclose(coordinate_median(ups)["w"], [2.5, -2.5])
    # 4 updates, 10 %: one cut from each end anyway (so one outlier is always dropped).
    assert np.allclose(trimmed_mean(ups, 0.1)["w"], [2.5, -2.5])
    assert np.allclose(trimmed_mean(ups, 0.0)["w"], [4.0, -4.0])  # no trimming: the mean
    ups5 = [*ups, ("d9", {"w": np.array([5, -5], np.float32)}, 1)]
    assert np.allclose(coordinate_median(ups5)["w"], [3, -3])
    assert np.allclose(trimmed_mean(ups5, 0.2)["w"], [10 / 3, -10 / 3])
    assert trimmed_mean(ups5, 0.2)["w"].dtype == np.float32


@pytest.mark.parametrize("outlier", [1e6, -1e6, 0.0, 50.0])
def test_one_outlier_cannot_move_median_or_trimmed_mean_out_of_the_honest_range(
    outlier: float,
) -> None:
    ups = honest(7)
    lo = np.min([u[1]["w"] for u in ups], axis=0)
    hi = np.max([u[1]["w"] for u in ups], axis=0)
    for aggregated in (
        coordinate_median([*ups, poison(outlier, 10**15)]),
        trimmed_mean([*ups, poison(outlier, 10**15)], 0.1),
    ):
        assert np.all(aggregated["w"] >= lo) and np.all(aggregated["w"] <= hi)
    # FedAvg, by contrast, follows the outlier's claimed weight all the way.
    assert np.allclose(fedavg([*ups, poison(outlier, 10**15)])["w"], outlier, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 9), st.floats(-1e9, 1e9, allow_nan=False), st.integers(0, 2**31))
def test_robust_aggregators_resist_one_outlier_property(n: int, outlier: float, seed: int) -> None:
    ups = honest(n, seed)
    lo = np.min([u[1]["w"] for u in ups], axis=0)
    hi = np.max([u[1]["w"] for u in ups], axis=0)
    for name in ("median", "trimmed_mean"):
        w = aggregate([*ups, poison(outlier, 10**15)], name, trim_fraction=0.1)["w"]
        assert np.all(w >= lo - 1e-6) and np.all(w <= hi + 1e-6), name


def test_robust_aggregators_are_order_independent_and_validate() -> None:
    ups = honest(6, seed=3)
    for name in AGGREGATORS:
        ref = aggregate(ups, name)
        for perm in itertools.islice(itertools.permutations(ups), 5):
            out = aggregate(list(perm), name)
            assert all(np.array_equal(out[k], ref[k]) for k in ref)
        assert ref["steps"].dtype == np.int64
    bad = [*ups, ("dev50", {"w": np.full((3, 4), np.nan, np.float32), "steps": np.array(1)}, 100)]
    for name in AGGREGATORS:
        with pytest.raises(UpdateRejected, match="non-finite"):
            aggregate(bad, name)
    with pytest.raises(ConfigError, match="aggregator"):
        aggregate(ups, "mean-ish")
    with pytest.raises(ConfigError, match="trim_fraction"):
        trimmed_mean(ups, 0.5)


def test_sample_weight_is_capped_by_the_data_plan() -> None:
    caps = {"dev00": 200, "dev01": 200, "dev99": 200}
    ups = honest(2)
    c = RoundCollector(round=1, expected=caps, min_updates=3, deadline_s=1.0, max_samples=caps)
    for device, s, n in ups:
        assert c.add(device, s, 2 * n, now=0.0)  # exactly the cap: untouched
    zeros = poison(0.0, 10**15)
    assert c.add(zeros[0], zeros[1], zeros[2], now=0.0)
    assert c.capped == {"dev99": (10**15, 200)}
    res = c.result()
    # The zeros weigh what the plan gave dev99 (a third), not 10**15 / (10**15 + 400).
    expected = (ups[0][1]["w"].astype(np.float64) + ups[1][1]["w"]) / 3
    assert np.allclose(res.state["w"], expected, atol=1e-6)
    assert res.n_samples == 600
    # A device that has no share of the plan is refused, not weighed.
    c = RoundCollector(
        round=1,
        expected=["dev00", "dev77"],
        min_updates=1,
        deadline_s=1.0,
        max_samples={"dev00": 200},
    )
    assert not c.add("dev77", ups[0][1], 10, now=0.0)
    assert "data plan" in c.rejected["dev77"]


def test_honest_caps_change_no_bit_of_fedavg() -> None:
    ups = honest(5, seed=8)
    caps = {d: n for d, _, n in ups}
    plain = RoundCollector(round=1, expected=caps, min_updates=5, deadline_s=1.0)
    capped = RoundCollector(round=1, expected=caps, min_updates=5, deadline_s=1.0, max_samples=caps)
    for d, s, n in ups:
        assert plain.add(d, s, n, 0.0) and capped.add(d, s, n, 0.0)
    a, b = plain.result().state, capped.result().state
    assert all(np.array_equal(a[k], b[k]) for k in a) and not capped.capped


def test_norm_reference_is_not_zeroed_by_a_zero_update_round() -> None:
    rng = np.random.default_rng(1)
    model = {"w": rng.normal(0, 1, size=(10, 10)).astype(np.float32)}
    ref = NormReference(window=5)
    for _ in range(3):
        ref.observe(model)
    zeroed = {"w": np.zeros_like(model["w"])}  # what a poisoned round left
    value = ref.observe(zeroed)
    assert value == pytest.approx(state_norm(model), rel=1e-6)
    # Against the zeroed global model's own norm, every honest update would be refused;
    # against the reference, an honest step from it passes and a huge one does not.
    step = {"w": (zeroed["w"] + rng.normal(0, 0.5, size=(10, 10))).astype(np.float32)}
    with pytest.raises(UpdateRejected, match="norm ratio"):
        _collect(zeroed, step, norm_reference=None)
    assert _collect(zeroed, step, norm_reference=ref.value)
    huge = {"w": np.full((10, 10), 1e4, np.float32)}
    with pytest.raises(UpdateRejected, match="norm ratio"):
        _collect(zeroed, huge, norm_reference=ref.value)
    # One bad round is one of five: it takes three in a row to move the median.
    ref.observe(zeroed)
    assert ref.observe(zeroed) == 0.0  # three zero rounds of five: now the median follows
    with pytest.raises(ConfigError):
        NormReference(window=0)
    assert NormReference().value is None


def _collect(reference: State, update: State, norm_reference: float | None) -> bool:
    c = RoundCollector(
        round=1,
        expected=["a"],
        min_updates=1,
        deadline_s=1.0,
        reference=reference,
        max_norm_ratio=10.0,
        norm_reference=norm_reference,
    )
    if not c.add("a", update, 10, 0.0):
        raise UpdateRejected(c.rejected["a"])
    return True


def test_collector_aggregator_choice_and_errors() -> None:
    ups = [*honest(4), poison(1e3)]
    c = RoundCollector(
        round=1, expected=[u[0] for u in ups], min_updates=5, deadline_s=1.0, aggregator="median"
    )
    for d, s, n in ups:
        assert c.add(d, s, n, 0.0)
    assert np.all(c.result().state["w"] < 2.0)
    with pytest.raises(ConfigError, match="aggregator"):
        RoundCollector(round=1, expected=["a"], min_updates=1, deadline_s=1.0, aggregator="krum")
    with pytest.raises(ConfigError, match="trim_fraction"):
        RoundCollector(
            round=1,
            expected=["a"],
            min_updates=1,
            deadline_s=1.0,
            aggregator="trimmed_mean",
            trim_fraction=-0.1,
        )


def test_scenario_selects_the_aggregator() -> None:
    c = from_dict({"fleet": {"aggregator": "trimmed_mean", "trim_fraction": 0.2}})
    assert (c.fleet.aggregator, c.fleet.trim_fraction) == ("trimmed_mean", 0.2)
    assert from_dict({}).fleet.aggregator == "fedavg"
    with pytest.raises(ConfigError, match=r"fleet\.aggregator"):
        from_dict({"fleet": {"aggregator": "mean"}})
    with pytest.raises(ConfigError, match=r"fleet\.trim_fraction"):
        from_dict({"fleet": {"trim_fraction": 0.5}})
