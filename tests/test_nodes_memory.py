"""Nodes on the in-memory bus: FedAvg's straggler policy and vertical scaling, without a broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from emo_mqtt.bus import MemoryBroker
from emo_mqtt.config import from_dict
from emo_mqtt.dataplan import plan_data
from emo_mqtt.fleet import build_nodes, run_algorithm
from emo_mqtt.nodes.device import DeviceNode

SMALL: dict[str, Any] = {
    "run": {"name": "mem", "rounds": 2},
    "data": {"samples_per_device": 150, "validation_samples": 300, "eval_samples_per_round": 300},
    "fleet": {"devices": 3, "overlays": 1, "min_updates": 2, "round_deadline_s": 4.0},
    "emo": {"overlay_steps_per_round": 5, "cache_entries": 1000},
}


def test_a_silent_device_never_stalls_a_round() -> None:
    """dev02 never starts: each round closes at its deadline with the two updates it has."""
    config = from_dict(SMALL)
    plan = plan_data(config)
    broker = MemoryBroker()

    async def scenario() -> list[dict[str, Any]]:
        server, others = build_nodes(broker, config, "fl", plan, None)
        server.start_timeout_s = 0.5  # do not wait long for the device that never comes
        running = [n for n in others if n.node_id != "dev02"]
        tasks = [asyncio.create_task(n.run_node()) for n in running]
        await asyncio.wait_for(server.run_node(), timeout=60)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        return server.history

    history = asyncio.run(scenario())
    assert [h["round"] for h in history] == [1, 2]
    for h in history:
        assert h["updates"] == 2
        assert h["missing"] == ["dev02"]
        assert h["wall_s"] >= 3.9 * h["round"]  # closed by the deadline, not by dev02


@pytest.mark.parametrize(
    ("model", "scaling"), [("overlay-cnn", "vertical"), ("overlay-mlp", "horizontal")]
)
def test_both_scalings_train_and_ensemble(model: str, scaling: str) -> None:
    config = from_dict(
        {
            **SMALL,
            "fleet": {**SMALL["fleet"], "round_deadline_s": 30},
            "emo": {**SMALL["emo"], "overlay_model": model, "scaling": scaling},
        }
    )
    plan = plan_data(config)
    summary = asyncio.run(run_algorithm(MemoryBroker(), config, "emo", plan, say=lambda _: None))
    members = summary["member_accuracy"]
    # Vertical: the overlay is stacked on the trunk and stands alone; horizontal: beside the head.
    expected = {"ovl0"} if scaling == "vertical" else {"fl", "ovl0"}
    assert set(members) == expected
    assert 0.1 < summary["accuracy"] <= 1.0
    assert summary["bytes_by_kind"]["activations"] > 0


def test_a_round_below_min_updates_closes_at_its_deadline_unaggregated() -> None:
    """min_updates 3 with one device silent: rounds close at the deadline, model unchanged."""
    config = from_dict({**SMALL, "fleet": {**SMALL["fleet"], "min_updates": 3}})
    plan = plan_data(config)
    broker = MemoryBroker()

    async def scenario() -> tuple[list[dict[str, Any]], str]:
        server, others = build_nodes(broker, config, "fl", plan, None)
        server.start_timeout_s = 0.5
        from emo_mqtt.models import state_to_numpy

        before = state_to_numpy(server.model)
        tasks = [asyncio.create_task(n.run_node()) for n in others if n.node_id != "dev02"]
        await asyncio.wait_for(server.run_node(), timeout=60)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        after = state_to_numpy(server.model)
        same = all(before[k].tobytes() == after[k].tobytes() for k in before)
        return server.history, "unchanged" if same else "changed"

    history, model = asyncio.run(scenario())
    assert [h["round"] for h in history] == [1, 2]
    assert all(not h["aggregated"] and h["updates"] == 0 for h in history)
    assert all(h["missing"] == ["dev02"] for h in history)
    assert model == "unchanged"


def test_a_slower_device_waits_out_the_difference() -> None:
    """compute_speed 0.25: after each training a device waits three times its compute time."""
    config = from_dict(
        {
            **SMALL,
            "fleet": {
                **SMALL["fleet"],
                "round_deadline_s": 30,
                "min_updates": 3,
                "device_compute_speed": 0.25,
            },
        }
    )
    plan = plan_data(config)
    broker = MemoryBroker()

    async def scenario() -> list[Any]:
        server, others = build_nodes(broker, config, "fl", plan, None)
        tasks = [asyncio.create_task(n.run_node()) for n in others]
        await asyncio.wait_for(server.run_node(), timeout=60)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        return others

    for device in asyncio.run(scenario()):
        assert isinstance(device, DeviceNode)
        assert device.compute_speed == 0.25
        assert device.compute_busy_s > 0
        assert device.compute_wait_s == pytest.approx(3 * device.compute_busy_s, rel=1e-6)
