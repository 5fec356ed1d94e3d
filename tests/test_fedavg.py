"""FedAvg maths, update validation, round collection with stragglers, client sampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_mqtt.errors import ConfigError, EmoError
from emo_mqtt.fedavg import (
    RoundCollector,
    UpdateRejected,
    fedavg,
    sample_clients,
    validate_update,
)


def state(value: float, *, shape: tuple[int, ...] = (2, 3)) -> dict[str, np.ndarray]:
    return {
        "w": np.full(shape, value, dtype=np.float32),
        "b": np.full(3, -value, dtype=np.float32),
        "steps": np.array(int(value), dtype=np.int64),
    }


def test_weighted_mean() -> None:
    out = fedavg([("a", state(1.0), 1), ("b", state(4.0), 3)])
    assert out["w"].dtype == np.float32 and np.allclose(out["w"], 3.25)
    assert np.allclose(out["b"], -3.25)
    assert out["steps"].dtype == np.int64 and int(out["steps"]) == 3  # rint(3.25)


def test_single_update_is_identity() -> None:
    s = state(2.5)
    out = fedavg([("only", s, 7)])
    assert all(np.array_equal(out[k], s[k]) for k in s)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(
        st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=6, unique=True
    ),
    counts=st.lists(st.integers(1, 10_000), min_size=6, max_size=6),
)
def test_order_independent_bitwise(values: list[float], counts: list[int]) -> None:
    rng = np.random.default_rng(len(values))
    updates = [
        (f"dev-{i}", {"w": rng.normal(v, 1.0, size=(4, 5)).astype(np.float32)}, counts[i])
        for i, v in enumerate(values)
    ]
    ref = fedavg(updates)
    for perm in itertools.islice(itertools.permutations(updates), 6):
        assert np.array_equal(fedavg(list(perm))["w"], ref["w"])
    manual = sum(u[1]["w"].astype(np.float64) * u[2] for u in updates) / sum(u[2] for u in updates)
    assert np.allclose(ref["w"], manual, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, "keys"),
        ({**state(0.0), "w": np.zeros((3, 2), np.float32)}, "shape"),
        ({**state(0.0), "w": np.zeros((2, 3), np.float64)}, "dtype"),
        ({**state(0.0), "w": np.full((2, 3), np.nan, np.float32)}, "non-finite"),
        ({**state(0.0), "b": np.array([1, np.inf, 0], np.float32)}, "non-finite"),
    ],
)
def test_rejects_bad_updates(bad: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(UpdateRejected, match=match) as err:
        fedavg([("a", state(1.0), 5), ("b", bad, 5)])
    assert err.value.device == "b" and isinstance(err.value, EmoError | ValueError)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_rejects_bad_sample_counts(n: object) -> None:
    with pytest.raises(UpdateRejected, match="n_samples"):
        validate_update(state(1.0), state(1.0), n)  # type: ignore[arg-type]


def test_rejects_duplicates_and_empty() -> None:
    with pytest.raises(UpdateRejected, match="duplicate"):
        fedavg([("a", state(1.0), 1), ("a", state(2.0), 1)])
    with pytest.raises(UpdateRejected, match="no updates"):
        fedavg([])


def test_norm_ratio_guard() -> None:
    ref = state(1.0)
    validate_update(ref, state(1.1), 10, max_norm_ratio=0.5)
    with pytest.raises(UpdateRejected, match="norm ratio"):
        validate_update(ref, state(3.0), 10, max_norm_ratio=0.5)


def test_collector_all_expected_arrive() -> None:
    c = RoundCollector(round=4, expected=["a", "b", "c"], min_updates=2, deadline_s=10.0)
    assert c.add("a", state(1.0), 10, now=1.0)
    assert not c.ready(now=2.0)
    assert c.add("b", state(2.0), 10, now=2.0)
    assert not c.ready(now=3.0)  # min reached but not all, deadline not passed
    assert c.add("c", state(3.0), 20, now=3.0)
    assert c.ready(now=3.0)
    res = c.result()
    assert res.contributors == ["a", "b", "c"] and res.n_samples == 40
    assert np.allclose(res.state["w"], 2.25)
    assert not c.add("a", state(9.0), 10, now=4.0)  # closed


def test_collector_duplicates_never_count_twice() -> None:
    c = RoundCollector(round=0, expected=["a", "b"], min_updates=2, deadline_s=5.0)
    assert c.add("a", state(1.0), 1, now=0.0)
    assert not c.add("a", state(100.0), 1000, now=0.1)  # QoS-1 redelivery or a second try
    assert not c.add("zz", state(1.0), 1, now=0.2)  # not sampled this round
    assert c.received == ["a"] and c.missing == ["b"]
    assert not c.ready(now=10.0) and c.failed(now=10.0)  # deadline, below min_updates
    with pytest.raises(UpdateRejected, match="min_updates"):
        c.result()


def test_collector_deadline_with_min_updates() -> None:
    c = RoundCollector(round=1, expected="abcd", min_updates=2, deadline_s=5.0, started_at=100.0)
    c.add("a", state(1.0), 1, now=101.0)
    c.add("b", state(3.0), 1, now=102.0)
    assert not c.ready(now=104.9)
    assert c.ready(now=105.0) and not c.failed(now=105.0)
    assert c.add("c", state(5.0), 1, now=105.5)  # late but before result: still welcome
    res = c.result()
    assert res.contributors == ["a", "b", "c"] and np.allclose(res.state["w"], 3.0)


def test_collector_validates_against_reference() -> None:
    c = RoundCollector(
        round=2,
        expected=["a", "b"],
        min_updates=1,
        deadline_s=1.0,
        reference=state(1.0),
        max_norm_ratio=1.0,
    )
    assert not c.add("a", {**state(1.0), "w": np.zeros(6, np.float32)}, 5, now=0.0)
    assert "shape" in c.rejected["a"]
    assert not c.add("b", state(50.0), 5, now=0.0)
    assert "norm ratio" in c.rejected["b"]
    assert c.received == []


def test_collector_config_errors() -> None:
    with pytest.raises(ConfigError):
        RoundCollector(round=0, expected=[], min_updates=1, deadline_s=1.0)
    with pytest.raises(ConfigError):
        RoundCollector(round=0, expected=["a"], min_updates=2, deadline_s=1.0)
    with pytest.raises(ConfigError):
        RoundCollector(round=0, expected=["a"], min_updates=1, deadline_s=0.0)


def test_sample_clients_deterministic() -> None:
    ids = [f"dev-{i:02d}" for i in range(10)]
    a = sample_clients(ids, 0.3, seed=1, round=5)
    assert a == sample_clients(list(reversed(ids)), 0.3, seed=1, round=5)
    assert len(a) == 3 and a == sorted(a) and set(a) <= set(ids)
    rounds = {tuple(sample_clients(ids, 0.3, seed=1, round=r)) for r in range(20)}
    assert len(rounds) > 5  # changes from round to round
    assert sample_clients(ids, 1.0, 0, 0) == ids
    assert sample_clients(ids, 1, 0, 0) != ids and len(sample_clients(ids, 1, 0, 0)) == 1
    assert len(sample_clients(ids, 0.01, 0, 0)) == 1
    assert sample_clients(ids, 50, 0, 0) == ids
    for bad in (0.0, 1.5, 0, True):
        with pytest.raises(ConfigError):
            sample_clients(ids, bad, 0, 0)
