"""Run identity and incarnations on a shared broker (issue 14 item 1, issue 11 item 7).

Two runs of one scenario on one broker must not meet; a run id that is live is refused
before anything is published; and a retained ``done`` or round announcement of an earlier
start of the same run id (what a crashed broker's autosave restores) neither ends nor
steers a new one.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import open_bus
from emo_mqtt.codec import encode
from emo_mqtt.config import RunConfig, from_dict
from emo_mqtt.dataplan import plan_data
from emo_mqtt.errors import ConfigError
from emo_mqtt.fleet import RunLive, build_nodes, run_id, run_scenario, with_run_id
from emo_mqtt.incarnation import IncarnationTracker, new_incarnation, order
from emo_mqtt.messages import Done, MessageError, RoundAnnouncement, Update
from emo_mqtt.models import build_fl_model, state_to_numpy
from emo_mqtt.nodes.base import Node
from emo_mqtt.topics import Kind, topic

ROUNDS = 3
SMALL: dict[str, Any] = {
    "run": {"name": "life", "seed": 3, "rounds": ROUNDS, "algorithms": ["fl"]},
    "data": {"samples_per_device": 200, "validation_samples": 300, "eval_samples_per_round": 300},
    "fleet": {"devices": 3, "min_updates": 3, "round_deadline_s": 30},
}


def small(**run: Any) -> RunConfig:
    return from_dict({**SMALL, "run": {**SMALL["run"], **run}})


# ------------------------------------------------------------------- pure: the rules


def test_incarnations_order_by_start_time() -> None:
    old, new = new_incarnation(10**18), new_incarnation(10**18 + 1)
    assert order("") < order(old) < order(new)
    assert new_incarnation() != new_incarnation()


def test_a_tracker_follows_the_newest_start_and_refuses_older_ones() -> None:
    old, new = new_incarnation(10**18), new_incarnation(2 * 10**18)
    t = IncarnationTracker()
    assert t.admit(old).switched
    assert t.admit(old).reason is None and not t.admit(old).switched
    assert t.admit(new).switched  # a server restarted from its checkpoint, or a new run
    assert t.admit(old).reason == "stale_incarnation"
    assert t.admit(old, ends_run=True).reason == "stale_incarnation"
    assert t.admit(new, ends_run=True).reason is None
    assert t.refused == {"stale_incarnation": 2}


def test_a_retained_done_ends_only_an_incarnation_seen_live() -> None:
    """A crashed broker's autosave restores an old round and its ``done`` together."""
    old, new = new_incarnation(10**18), new_incarnation(2 * 10**18)
    t = IncarnationTracker()
    assert t.admit(old, retained=True).switched  # the restored round: followed for now
    assert t.admit(old, ends_run=True, retained=True).reason == "unconfirmed_incarnation"
    assert t.admit(new).switched  # the new start's first round, live
    assert t.admit(new, ends_run=True, retained=True).reason is None  # e.g. after a reconnect


def test_done_before_any_round_is_not_taken() -> None:
    """A retained ``done`` met at subscribe time, before this start's first round."""
    t = IncarnationTracker()
    assert t.admit(new_incarnation(), ends_run=True).reason == "unknown_incarnation"
    assert t.current is None


def test_a_pinned_tracker_takes_its_incarnation_only() -> None:
    mine = new_incarnation()
    t = IncarnationTracker(pinned=mine)
    assert t.admit(mine).reason is None and t.admit(mine, ends_run=True).reason is None
    assert t.admit(new_incarnation()).reason == "other_incarnation"  # even a newer one
    assert t.admit("").reason == "other_incarnation"


def test_the_incarnation_field_is_optional_and_validated() -> None:
    weights = state_to_numpy(build_fl_model("cnn-small"))
    body = Done(3, weights, "finished").to_body()
    assert "incarnation" not in body  # without one, the frame is what it always was
    assert Done.from_body(body, limits=_limits()).incarnation == ""
    inc = new_incarnation()
    assert Done.from_body({**body, "incarnation": inc}, limits=_limits()).incarnation == inc
    for bad, reason in ((7, "bad_type"), ("x" * 30, "bad_incarnation"), ("../", "bad_incarnation")):
        with pytest.raises(MessageError) as caught:
            Done.from_body({**body, "incarnation": bad}, limits=_limits())
        assert caught.value.reason == reason
    update = Update(1, weights, 10, 0.5, inc)
    assert Update.from_body(update.to_body(), limits=_limits()).incarnation == inc


def _limits() -> Any:
    from emo_mqtt.messages import Limits

    return Limits()


def test_run_ids_are_fresh_per_start_unless_chosen() -> None:
    config = small()
    a, b = with_run_id(config), with_run_id(config)
    assert a.run.id.startswith("life-") and a.run.id != b.run.id
    assert run_id(a, "emo_all") == f"{a.run.id}-emo-all"
    assert with_run_id(config, "mine").run.id == "mine"
    assert with_run_id(a).run.id == a.run.id  # an id already chosen is kept
    with pytest.raises(ConfigError, match=r"run\.id"):
        small(id="bad/id")


# ---------------------------------------------------------------- on a real Mosquitto


@pytest.mark.broker
def test_two_runs_of_one_scenario_on_one_broker_both_finish_apart(
    mosquitto: BrokerHandle,
) -> None:
    """Started together, as two users would: separate ids, every round, the same FL model
    (FL is deterministic for a seed, so a run disturbed by the other would differ)."""
    config = small()
    lines: list[list[str]] = [[], []]

    async def both() -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(
                run_scenario(mosquitto.url, config, None, say=lines[0].append),
                run_scenario(mosquitto.url, config, None, say=lines[1].append),
            )
        )

    first, second = asyncio.run(both())
    ids = {first["config"]["run"]["id"], second["config"]["run"]["id"]}
    assert len(ids) == 2 and all(i.startswith("life-") for i in ids)
    for summary in (first, second):
        fl = summary["algorithms"]["fl"]
        assert fl["rounds"] == ROUNDS
        assert fl["nodes_reporting"] == 4  # its own server and 3 devices, not the other's
        assert "stale_incarnation" not in json.dumps(fl["rejected"])
    assert (
        first["algorithms"]["fl"]["fl_model_sha256"]
        == (second["algorithms"]["fl"]["fl_model_sha256"])
    )
    assert first["algorithms"]["fl"]["accuracy"] == second["algorithms"]["fl"]["accuracy"]


@pytest.mark.broker
def test_a_live_run_id_is_refused_before_anything_is_published(
    fresh_mosquitto: BrokerHandle,
) -> None:
    url = fresh_mosquitto.url
    config = small(id="taken")
    run = run_id(config, "fl")

    async def scenario() -> list[str]:
        seen: list[str] = []
        async with open_bus(url, "live-server", clean_start=True) as live:
            status = {"state": "online", "role": "server", "id": "server", "run": run}
            await live.publish(
                topic(Kind.STATUS, run, node="server", role="server"),
                json.dumps(status).encode(),
                retain=True,
            )
            async with open_bus(url, "watcher", clean_start=True) as watcher:
                await watcher.subscribe(f"emo/{run}/#")
                with pytest.raises(RunLive, match="is live on this broker"):
                    await run_scenario(url, config, None, say=lambda _: None)
                # Our own marker, then everything the refused run might have sent before it.
                await live.publish(f"emo/{run}/telemetry/metrics/server/marker", b"{}")
                async for message in watcher.messages():
                    seen.append(message.topic)
                    if message.topic.endswith("/marker"):
                        break
        return seen

    seen = asyncio.run(scenario())
    status_topic = topic(Kind.STATUS, run, node="server", role="server")
    assert seen == [status_topic, f"emo/{run}/telemetry/metrics/server/marker"]


async def _retain_old_start(url: str, config: RunConfig, old: str) -> None:
    """What a crashed broker's autosave restores: an earlier start's round 2 and ``done``."""
    run = run_id(config, "fl")
    weights = state_to_numpy(build_fl_model(config.fl.model))
    devices = tuple(config.device_ids())
    round_body = RoundAnnouncement(2, "fl", devices, 30.0, weights, old).to_body()
    done_body = Done(ROUNDS, weights, "finished", old).to_body()
    async with open_bus(url, "old-server", clean_start=True) as bus:
        await bus.publish(
            topic(Kind.SERVER_ROUND, run),
            encode(round_body, kind="round", sender="server", run=run, seq=1),
            retain=True,
        )
        await bus.publish(
            topic(Kind.SERVER_DONE, run),
            encode(done_body, kind="done", sender="server", run=run, seq=2),
            retain=True,
        )


def _rejected(node: Node) -> dict[str, int]:
    return dict(node.bus.stats.rejected)


@pytest.mark.broker
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "following"])
def test_an_old_retained_done_does_not_stop_a_new_incarnation(
    fresh_mosquitto: BrokerHandle, pinned: bool
) -> None:
    """Pinned: ``emo run``'s nodes know the incarnation. Following: standalone nodes learn
    it from the server's rounds (the old start's round 2 is older than the new one)."""
    url = fresh_mosquitto.url
    config = small(id="again")
    plan = plan_data(config)
    old = new_incarnation(time.time_ns() - 3600 * 10**9)  # an hour before this start

    async def scenario() -> tuple[Any, list[Node]]:
        await _retain_old_start(url, config, old)
        server, others = build_nodes(
            url, config, "fl", plan, None, incarnation=new_incarnation() if pinned else None
        )
        tasks = [asyncio.create_task(n.run_node()) for n in others]
        tasks.append(asyncio.create_task(server.run_node()))
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return server, others

    server, devices = asyncio.run(scenario())
    assert [h["round"] for h in server.history] == list(range(1, ROUNDS + 1))
    assert all(h["updates"] == 3 for h in server.history), server.history
    for device in devices:
        rejected = _rejected(device)
        if pinned:
            assert rejected.get("done:other_incarnation", 0) >= 1, rejected
            assert rejected.get("round:other_incarnation", 0) >= 1, rejected
        else:
            assert rejected.get("done:unconfirmed_incarnation", 0) >= 1, rejected
        assert device.round == ROUNDS
