"""The telemetry branch on a real broker: one wildcard gives all the JSON and nothing else,
and the server's retained run state says live, finished or interrupted.

A real Mosquitto, a short real run (FedAvg and EMO on Fashion-MNIST), and a subscriber on
the documented filter ``emo/+/telemetry/#`` (docs/monitoring.md leads with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import until

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import Message, open_bus
from emo_mqtt.config import from_dict
from emo_mqtt.fleet import Interrupted, run_scenario
from emo_mqtt.topics import Kind, parse, telemetry_filter

RUN: dict[str, Any] = {
    "run": {
        "name": "tele",
        "id": "tele",
        "seed": 5,
        "rounds": 2,
        "algorithms": ["fl", "emo"],
        "target_accuracy": 0.5,
    },
    "data": {
        "partition": "dirichlet",
        "alpha": 0.5,
        "samples_per_device": 200,
        "validation_samples": 300,
        "eval_samples_per_round": 300,
    },
    "fleet": {"devices": 3, "overlays": 1, "min_updates": 2, "round_deadline_s": 60},
    "emo": {"overlay_steps_per_round": 10, "cache_entries": 1000},
}


@contextlib.asynccontextmanager
async def watching(url: str, client: str) -> AsyncIterator[list[Message]]:
    """Collect every message on the documented wildcard while the block runs."""
    got: list[Message] = []
    async with open_bus(url, client, clean_start=True) as bus:
        await bus.subscribe(telemetry_filter())

        async def collect() -> None:
            async for message in bus.messages():
                got.append(message)

        task = asyncio.create_task(collect())
        try:
            yield got
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def retained_run_state(url: str, run: str) -> dict[str, Any]:
    """The retained ``telemetry/run`` of ``run``, as a dashboard opened now gets it."""
    async with open_bus(url, f"{run}-late-reader", clean_start=True) as bus:
        await bus.subscribe(f"emo/{run}/telemetry/run")
        async with asyncio.timeout(10):
            async for message in bus.messages():
                if message.payload:
                    body: dict[str, Any] = json.loads(bytes(message.payload))
                    return body
    raise AssertionError("unreachable")


@pytest.mark.broker
async def test_one_wildcard_gives_all_json_of_every_node(mosquitto: BrokerHandle) -> None:
    config = from_dict(RUN)
    async with watching(mosquitto.url, "tele-watch") as got:
        await run_scenario(mosquitto.url, config, None, say=lambda _: None)
        await asyncio.sleep(0.5)  # the last goodbyes
    seen: dict[str, dict[str, set[str]]] = {}
    states: list[str] = []
    for message in got:
        payload = bytes(message.payload)
        where = parse(message.topic)  # every topic is one of the grammar's
        assert message.topic.split("/")[2] == "telemetry", message.topic
        if not payload:
            continue  # a retained topic being cleared (emo run does it before a run)
        body = json.loads(payload)  # never a codec frame: valid UTF-8 JSON, an object
        assert isinstance(body, dict), message.topic
        per_run = seen.setdefault(where.run, {})
        if where.kind is Kind.RUN_STATE:
            states.append(f"{where.run}:{body['state']}")
            continue
        per_run.setdefault(where.kind.value, set()).add(f"{where.role}/{where.node}")
    devices = {f"device/dev0{i}" for i in range(3)}
    assert seen["tele-fl"] == {
        "status": devices | {"server/server"},
        "metrics": devices | {"server/server"},
    }
    every = devices | {"server/server", "overlay/ovl0"}
    assert seen["tele-emo"] == {"status": every, "metrics": every}
    for run in ("tele-fl", "tele-emo"):
        assert states.count(f"{run}:finished") == 1
        assert states.index(f"{run}:live") < states.index(f"{run}:finished")
    late = await retained_run_state(mosquitto.url, "tele-emo")
    assert late["state"] == "finished" and late["closed"] == late["rounds"] == 2
    assert [r["round"] for r in late["history"]] == [1, 2] and late["controller"]
    assert late["layout"] == {"ovl0": ["dev00", "dev01", "dev02"]}
    assert late["final"]["accuracy"] == late["final"]["accuracy"]  # a number, not NaN


@pytest.mark.broker
async def test_interrupted_run_says_so_and_a_rerun_starts_live(mosquitto: BrokerHandle) -> None:
    raw = {**RUN, "run": {**RUN["run"], "id": "tele-cut", "rounds": 30, "algorithms": ["fl"]}}
    config = from_dict(raw)
    async with watching(mosquitto.url, "tele-cut-watch") as got:
        task = asyncio.create_task(run_scenario(mosquitto.url, config, None, say=lambda _: None))

        def closed_one() -> bool:
            return any(
                json.loads(bytes(m.payload)).get("closed", 0) >= 1
                for m in got
                if m.topic == "emo/tele-cut-fl/telemetry/run" and m.payload
            )

        await until(closed_one, "round 1 closed", within_s=120)
        task.cancel()
        with pytest.raises(Interrupted):
            await task
    late = await retained_run_state(mosquitto.url, "tele-cut-fl")
    assert late["state"] == "interrupted" and late["rounds"] == 30
    assert 1 <= late["closed"] < 30
    # The same run id again: emo run clears the old state, the new server says live.
    short = from_dict({**raw, "run": {**raw["run"], "rounds": 1}})
    async with watching(mosquitto.url, "tele-cut-watch2") as again:
        await run_scenario(mosquitto.url, short, None, say=lambda _: None)
    firsts = [
        json.loads(bytes(m.payload))["state"]
        for m in again
        if m.topic == "emo/tele-cut-fl/telemetry/run" and m.payload
    ]
    assert firsts[0] == "interrupted"  # the retained one, before the rerun cleared it
    assert firsts[-1] == "finished" and "live" in firsts
    late = await retained_run_state(mosquitto.url, "tele-cut-fl")
    assert late["state"] == "finished" and late["rounds"] == 1
