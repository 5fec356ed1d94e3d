"""Faults and bad input against a real Mosquitto: nothing lost, nothing counted twice.

Each test runs a short FedAvg (or EMO) fleet of four devices as asyncio tasks, injects one
fault (a broker restart, a crashed device, overlay or server, replayed or forged updates)
and checks that the run finishes with every round, and, since FL is deterministic for a
seed, with the very FL model of an undisturbed run (``clean_hash``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import until

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import open_bus
from emo_mqtt.bus.mqtt import MqttBus
from emo_mqtt.codec import decode, encode
from emo_mqtt.config import RunConfig, from_dict
from emo_mqtt.dataplan import DataPlan, plan_data
from emo_mqtt.fedavg import RoundCollector
from emo_mqtt.fleet import build_nodes, reset_run, run_id, warm_up
from emo_mqtt.nodes.base import Node, node_bus
from emo_mqtt.nodes.overlay import OverlayNode
from emo_mqtt.nodes.server import ServerNode
from emo_mqtt.topics import Kind

ROUNDS = 4
BASE: dict[str, Any] = {
    "run": {"name": "faults", "rounds": ROUNDS, "algorithms": ["fl"]},
    "data": {"samples_per_device": 200, "validation_samples": 300, "eval_samples_per_round": 300},
    "fleet": {"devices": 4, "overlays": 2, "min_updates": 2, "round_deadline_s": 30},
    "emo": {"overlay_steps_per_round": 5, "cache_entries": 1000},
}

During = Callable[[ServerNode, list[Node], dict[str, asyncio.Task[None]]], Coroutine[Any, Any, Any]]


def config_with(**fleet: Any) -> RunConfig:
    return from_dict({**BASE, "fleet": {**BASE["fleet"], **fleet}})


async def crash(node: Node, task: asyncio.Task[None]) -> None:
    """Kill a node as a crash would: its TCP connection cut (no DISCONNECT, so the broker
    publishes its last will), no goodbye, no reconnect, its tasks gone."""
    bus = node.bus
    assert isinstance(bus, MqttBus)
    bus.sever(reconnect=False)
    node.cancel_background()
    while not task.done():  # cancel again whatever goodbye the finally block attempts
        task.cancel()
        await asyncio.sleep(0.01)


async def fleet(
    url: str,
    config: RunConfig,
    algorithm: str,
    plan: DataPlan,
    *,
    during: During | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[ServerNode, list[Node], Any]:
    """Run one fleet to its end with ``during`` running beside it; (server, others, result).

    ``during`` may crash nodes and replace them: it returns the server that finished the
    run when it replaced the server, else anything.
    """
    # As emo run does: a cold torch pays about a second on its first training in each compute
    # thread, which would eat a short round deadline (the test alone, not in the suite).
    await warm_up(config, plan)
    await reset_run(url, config, algorithm)
    server, others = build_nodes(url, config, algorithm, plan, None, checkpoint_dir=checkpoint_dir)
    tasks = {n.node_id: asyncio.create_task(n.run_node()) for n in others}
    tasks["server"] = asyncio.create_task(server.run_node())
    side = asyncio.create_task(during(server, others, tasks)) if during else None
    result = None
    try:
        if side is not None:
            result = await asyncio.wait_for(side, timeout=80)
            if isinstance(result, ServerNode):
                server = result
        await asyncio.wait_for(tasks["server"], timeout=80)
        await asyncio.wait_for(
            asyncio.gather(*(tasks[n.node_id] for n in others), return_exceptions=True), timeout=30
        )
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return server, others, result


def assert_complete(server: ServerNode, updates: int = 4) -> None:
    assert [h["round"] for h in server.history] == list(range(1, ROUNDS + 1))
    for h in server.history:
        assert h["updates"] == updates, h


@pytest.fixture(scope="module")
def plan() -> DataPlan:
    return plan_data(config_with())


@pytest.fixture(scope="module")
def clean_hash(mosquitto: BrokerHandle, plan: DataPlan) -> str:
    """The FL model of an undisturbed run (all figures below compare to it)."""
    server, _, _ = asyncio.run(fleet(mosquitto.url, config_with(), "fl", plan))
    assert_complete(server)
    return str(server.final["fl_model_sha256"])


def test_broker_restart_mid_round_loses_nothing(
    fresh_mosquitto: BrokerHandle, plan: DataPlan, clean_hash: str
) -> None:
    """Mosquitto restarts during round 2: sessions and QoS 1 carry every update through."""

    async def restart(server: ServerNode, others: list[Node], _: Any) -> None:
        collect = server.collect_round

        async def collect_and_restart(collector: RoundCollector) -> Any:
            if collector.round == 2:
                # One update in, the others in flight or in training: restart now.
                await until(lambda: len(collector.received) >= 1, "a round-2 update")
                fresh_mosquitto.restart()  # SIGTERM (persistence saved), the same port again
            return await collect(collector)

        server.collect_round = collect_and_restart  # type: ignore[method-assign]
        await until(lambda: server.bus.stats.reconnects >= 1, "the server reconnecting")

    server, others, _ = asyncio.run(
        fleet(fresh_mosquitto.url, config_with(), "fl", plan, during=restart)
    )
    assert_complete(server)
    assert all(n.bus.stats.reconnects >= 1 for n in [server, *others])
    assert server.final["fl_model_sha256"] == clean_hash


def test_device_crash_mid_round_closes_at_deadline(
    fresh_mosquitto: BrokerHandle, plan: DataPlan
) -> None:
    """dev03 dies while training round 2: rounds 2.. close at their deadline with 3 updates."""
    config = config_with(round_deadline_s=1.5)

    async def kill_dev03(
        server: ServerNode, others: list[Node], tasks: dict[str, asyncio.Task[None]]
    ) -> None:
        dev = next(n for n in others if n.node_id == "dev03")
        send, dying = dev.send, asyncio.Event()

        async def send_or_die(kind: Kind, body: Any, **kw: Any) -> None:
            if kind is Kind.DEVICE_UPDATE and body["round"] == 2:
                dying.set()  # trained round 2, dies before its update leaves
                await asyncio.Event().wait()
            await send(kind, body, **kw)

        dev.send = send_or_die  # type: ignore[method-assign]
        await dying.wait()
        await crash(dev, tasks["dev03"])
        # Its last will reaches the server: the device is known offline.
        await until(lambda: "dev03" not in server.online, "dev03's will")

    server, _, _ = asyncio.run(fleet(fresh_mosquitto.url, config, "fl", plan, during=kill_dev03))
    history = server.history
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert history[0]["updates"] == 4
    for h in history[1:]:
        assert h["updates"] == 3 and h["missing"] == ["dev03"], h
    assert server.final["fl_accuracy"] > 0.3


def test_overlay_crash_leaves_fl_untouched_and_resumes_from_checkpoint(
    fresh_mosquitto: BrokerHandle, plan: DataPlan, clean_hash: str, tmp_path: Path
) -> None:
    """ovl0 crashes after its first training and restarts from its checkpoint and cache."""
    config = config_with()
    ckpt = tmp_path / "ckpt"
    seen: dict[str, Any] = {}

    async def kill_ovl0(
        server: ServerNode, others: list[Node], tasks: dict[str, asyncio.Task[None]]
    ) -> OverlayNode:
        old = next(n for n in others if n.node_id == "ovl0")
        assert isinstance(old, OverlayNode)
        meta = ckpt / "emo" / "ovl0" / "overlay.json"
        await until(meta.exists, "ovl0's first checkpoint")
        await crash(old, tasks["ovl0"])
        seen["checkpoint"] = json.loads(meta.read_text())
        await asyncio.sleep(0.5)  # the fleet carries on without it
        run = run_id(config, "emo")
        new = OverlayNode(
            node_bus(fresh_mosquitto.url, run, "overlay", "ovl0"),
            config,
            run,
            "ovl0",
            checkpoint_dir=ckpt / "emo" / "ovl0",
        )
        seen["restored_entries"] = len(new.cache)
        seen["restored_version"] = new.resumed_version
        tasks["ovl0"] = asyncio.create_task(new.run_node())
        seen["new"] = new
        return new

    server, _, _ = asyncio.run(
        fleet(fresh_mosquitto.url, config, "emo", plan, during=kill_ovl0, checkpoint_dir=ckpt)
    )
    assert_complete(server)
    assert server.final["fl_model_sha256"] == clean_hash  # FL never noticed
    new: OverlayNode = seen["new"]
    assert seen["restored_version"] == seen["checkpoint"]["version"] >= 1
    assert seen["restored_entries"] > 0  # the cache came back with it
    assert new.version > seen["restored_version"]  # and it trained on from there
    assert new.trained_round == ROUNDS
    assert server.overlays["ovl0"]["version"] == new.version


def test_server_restart_resumes_from_checkpoint(
    fresh_mosquitto: BrokerHandle, plan: DataPlan, clean_hash: str, tmp_path: Path
) -> None:
    """The server dies once round 3 is under way; a new one resumes after round 2."""
    config = config_with()
    ckpt = tmp_path / "ckpt"

    async def kill_server(
        server: ServerNode, others: list[Node], tasks: dict[str, asyncio.Task[None]]
    ) -> ServerNode:
        collect, dying = server.collect_round, asyncio.Event()

        async def collect_or_die(collector: RoundCollector) -> Any:
            if collector.round == 3:
                # Two round-3 updates consumed by this server die with it: the devices must
                # send them again to its successor.
                await until(lambda: len(collector.received) >= 2, "two round-3 updates")
                dying.set()
                await asyncio.Event().wait()
            return await collect(collector)

        server.collect_round = collect_or_die  # type: ignore[method-assign]
        await dying.wait()
        await crash(server, tasks["server"])
        meta = json.loads((ckpt / "fl" / "server" / "server.json").read_text())
        assert meta["round"] == 2
        run = run_id(config, "fl")
        new = ServerNode(
            node_bus(fresh_mosquitto.url, run, "server", "server"),
            config,
            run,
            "fl",
            plan,
            checkpoint_dir=ckpt / "fl" / "server",
        )
        tasks["server"] = asyncio.create_task(new.run_node())
        return new

    server, _, _ = asyncio.run(
        fleet(fresh_mosquitto.url, config, "fl", plan, during=kill_server, checkpoint_dir=ckpt)
    )
    assert server.resumed_from == 2
    assert_complete(server)
    assert [h["round"] for h in server.history[:2]] == [1, 2]  # from the checkpoint
    assert server.final["fl_model_sha256"] == clean_hash
    with np.load(ckpt / "fl" / "server" / "server.npz", allow_pickle=False) as z:
        assert all(k.startswith(("model/", "prev_probe")) for k in z.files)


def test_duplicated_and_replayed_updates_never_count_twice(
    fresh_mosquitto: BrokerHandle, plan: DataPlan, clean_hash: str
) -> None:
    """A replayer republishes every update twice at once and again a round later."""
    url = fresh_mosquitto.url
    run = run_id(config_with(), "fl")

    async def replay(server: ServerNode, others: list[Node], _: Any) -> int:
        sent = 0
        kept: list[tuple[str, bytes]] = []

        async def loop() -> None:
            nonlocal sent
            async with open_bus(url, "replayer", clean_start=True) as bus:
                await bus.subscribe(f"emo/{run}/device/+/update")
                async for message in bus.messages():
                    frame = bytes(message.payload)
                    env = decode(frame)
                    if env.seq >= 10_000 or frame in (f for _, f in kept):
                        continue  # our own replays coming back: no amplification
                    if kept:  # an update of an earlier moment, out of order
                        await bus.publish(*kept[sent % len(kept)])
                    await bus.publish(message.topic, frame)  # the same envelope, twice
                    await bus.publish(message.topic, frame)
                    # The same update in a new envelope (as a device sending it again).
                    await bus.publish(
                        message.topic,
                        encode(
                            env.body, kind="update", sender=env.sender, run=run, seq=10_000 + sent
                        ),
                    )
                    sent += 4
                    kept.append((message.topic, frame))

        task = asyncio.create_task(loop())
        try:
            await until(lambda: len(server.history) >= ROUNDS, "the last round", 80)
        finally:
            task.cancel()
        return sent

    server, _, sent = asyncio.run(fleet(url, config_with(), "fl", plan, during=replay))
    assert sent > 0
    assert_complete(server)
    rejected = server.bus.stats.rejected
    assert rejected.get("duplicate", 0) > 0  # same envelope: dropped on arrival
    assert rejected.get("duplicate_update", 0) + rejected.get("late_update", 0) > 0
    assert server.final["fl_model_sha256"] == clean_hash


def test_forged_updates_never_reach_the_average(
    fresh_mosquitto: BrokerHandle, plan: DataPlan, clean_hash: str
) -> None:
    """A rogue client impersonates dev00 each round with NaN, Inf, huge, mis-shaped and
    mis-typed updates (before dev00's own): all refused, the FL model unchanged."""
    url = fresh_mosquitto.url
    run = run_id(config_with(), "fl")

    def forgeries(weights: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        w = {k: np.asarray(v).copy() for k, v in weights.items()}
        name = next(k for k, v in w.items() if v.dtype.kind == "f" and v.size > 1)
        nan = {**w, name: np.full_like(w[name], np.nan)}
        inf = {**w, name: w[name] + np.float32(np.inf)}
        huge = {k: (v * np.float32(1e4) if v.dtype.kind == "f" else v) for k, v in w.items()}
        shape = {**w, name: w[name].reshape(-1)[:-1].copy()}
        dtype = {**w, name: w[name].astype(np.float64)}
        missing = {k: v for k, v in w.items() if k != name}
        return [nan, inf, huge, shape, dtype, missing]

    async def forge(server: ServerNode, others: list[Node], _: Any) -> int:
        sent = 0
        async with open_bus(url, "rogue", clean_start=True) as bus:
            await bus.subscribe(f"emo/{run}/server/round")
            async for message in bus.messages():
                env = decode(bytes(message.payload))
                r = int(env.body["round"])
                for state in forgeries(env.body["weights"]):
                    sent += 1
                    await bus.publish(
                        f"emo/{run}/device/dev00/update",
                        encode(
                            {"round": r, "weights": state, "samples": 200, "loss": 0.1},
                            kind="update",
                            sender="dev00",
                            run=run,
                            seq=1_000_000 + sent,
                        ),
                    )
                if r >= ROUNDS:
                    break
        return sent

    server, _, sent = asyncio.run(fleet(url, config_with(), "fl", plan, during=forge))
    assert sent == 6 * ROUNDS
    assert_complete(server)  # dev00's own update still counted each round
    rejected = server.bus.stats.rejected
    # NaN, Inf, mis-shaped, mis-typed and incomplete states fail validation on arrival
    # (``update:<reason>``); the huge one passes it and is refused by the norm bound.
    invalid = sum(n for reason, n in rejected.items() if reason.startswith("update:"))
    refused = ("bad_update", "late_update", "duplicate_update")  # the last: after dev00's own
    assert invalid + sum(rejected.get(reason, 0) for reason in refused) == sent
    assert invalid >= 5 * ROUNDS
    assert rejected.get("bad_update", 0) >= 1
    assert server.rejected_updates == rejected.get("bad_update", 0)
    assert server.final["fl_model_sha256"] == clean_hash


def test_update_norm_bound_is_configurable() -> None:
    from emo_mqtt.errors import ConfigError

    assert config_with().fleet.max_update_norm_ratio == 10.0
    assert config_with(max_update_norm_ratio=0).fleet.max_update_norm_ratio == 0  # off
    with pytest.raises(ConfigError, match="max_update_norm_ratio"):
        config_with(max_update_norm_ratio=-1)
