"""Where a large fleet's nodes run (emo_mqtt.placement): pure, no process or socket."""

from __future__ import annotations

import pytest

from emo_mqtt.config import MAX_DEVICES, from_dict
from emo_mqtt.errors import ConfigError
from emo_mqtt.placement import (
    AUTO_WORKERS_MIN_DEVICES,
    START_CONCURRENCY,
    BrokerMap,
    assign,
    resolve_workers,
    start_concurrency,
)


def test_assign_deals_every_node_once_overlays_spread() -> None:
    overlays = [f"ov{i}" for i in range(4)]
    devices = [f"dev{i:02d}" for i in range(40)]
    shares = assign(overlays, devices, 3)
    flat = [n for share in shares for n in share]
    assert sorted(flat) == sorted(overlays + devices)
    assert len(flat) == len(set(flat))
    # Overlays land on different workers before any worker gets a second one.
    assert [sum(n.startswith("ov") for n in s) for s in shares] == [2, 1, 1]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert assign(overlays, devices, 3) == shares  # deterministic


def test_assign_more_workers_than_nodes_leaves_some_empty() -> None:
    shares = assign([], ["a", "b"], 4)
    assert shares == [["a"], ["b"], [], []]
    with pytest.raises(ValueError):
        assign([], ["a"], 0)


def test_resolve_workers_default_follows_fleet_size_and_cores() -> None:
    assert resolve_workers(None, AUTO_WORKERS_MIN_DEVICES - 1, 8) == 0
    assert resolve_workers(None, AUTO_WORKERS_MIN_DEVICES, 8) == 8
    assert resolve_workers(None, 1000, 2) == 2
    assert resolve_workers(0, 1000, 2) == 0
    assert resolve_workers(3, 1000, 2) == 3  # asked for: honoured, even above the cores
    assert resolve_workers(16, 5, 2) == 5  # never more workers than devices
    with pytest.raises(ValueError):
        resolve_workers(-1, 10, 2)


def test_start_concurrency_is_bounded() -> None:
    assert start_concurrency(0) == 1
    assert start_concurrency(5) == 5
    assert start_concurrency(10_000) == START_CONCURRENCY
    assert start_concurrency(10_000, limit=8) == 8


def test_broker_map_has_one_answer_per_node() -> None:
    brokers = BrokerMap("mqtt://127.0.0.1:1", {"dev03": "mqtt://127.0.0.1:2"})
    assert brokers.broker_for("dev03") == "mqtt://127.0.0.1:2"
    assert brokers.broker_for("dev04") == "mqtt://127.0.0.1:1"


def test_fleet_cap_raised_and_data_check_still_refuses() -> None:
    base = {"data": {"min_samples_per_device": 5, "samples_per_device": 5}}
    assert from_dict({**base, "fleet": {"devices": MAX_DEVICES}}).fleet.devices == MAX_DEVICES
    with pytest.raises(ConfigError, match=r"fleet\.devices"):
        from_dict({**base, "fleet": {"devices": MAX_DEVICES + 1}})
    # 10,000 devices x 10 samples is more than Fashion-MNIST's training pool: refused.
    with pytest.raises(ConfigError, match="fleet too large for the data"):
        from_dict({"fleet": {"devices": MAX_DEVICES}})


def test_config_travels_to_workers_as_plain_data() -> None:
    config = from_dict({"fleet": {"devices": 300, "overlays": 3}, "run": {"seed": 7}})
    again = from_dict(config.to_dict(), config.source)
    # to_dict spells out every controller threshold: the same policy, written in full.
    assert again.controller.policy() == config.controller.policy()
    assert again.to_dict() == config.to_dict()
    for section in ("run", "data", "fleet", "fl", "sfl", "emo"):
        assert getattr(again, section) == getattr(config, section)
    assert again.device_ids() == config.device_ids()
