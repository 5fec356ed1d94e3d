"""``emo run``: a whole fleet on one machine, every algorithm of a scenario in turn.

The nodes of one algorithm run as asyncio tasks of this process, each with its own bus
connection: they share nothing but the broker. What the summary reports is what the nodes
published on their metrics topics (a monitor subscribes to them), so the same figures are
available to any dashboard, and the same code runs when the nodes are separate processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.bus import BusOptions, open_bus
from emo_mqtt.config import RunConfig
from emo_mqtt.data import Split
from emo_mqtt.dataplan import DataPlan, plan_data
from emo_mqtt.errors import ConfigError, EmoError, TelemetryError
from emo_mqtt.incarnation import new_incarnation
from emo_mqtt.models import build_fl_model, build_overlay_model, param_count
from emo_mqtt.msglog import MessageLog
from emo_mqtt.netreplay import NetworkReplay
from emo_mqtt.netscenario import MBPS
from emo_mqtt.nodes import compute
from emo_mqtt.nodes.base import Node, node_bus, wait_event
from emo_mqtt.nodes.device import DeviceNode
from emo_mqtt.nodes.overlay import OverlayNode
from emo_mqtt.nodes.server import ServerNode
from emo_mqtt.placement import FLEET_PUBLISH_TIMEOUT_S, BrokerMap, assign, start_concurrency
from emo_mqtt.sites import counts_since
from emo_mqtt.telemetry import REQUIRED_BY_EVENT, check_event, parse_metrics, progress_line
from emo_mqtt.topics import Kind, ParsedTopic, parse, run_filter, subscription
from emo_mqtt.training import make_generator, train_local

if TYPE_CHECKING:
    from emo_mqtt.broker.sites import SiteBrokers

log = logging.getLogger("emo_mqtt.fleet")

Say = Callable[[str], None]
#: Receives one JSON-ready dict per progress event (``emo run --jsonl``).
OnEvent = Callable[[dict[str, Any]], None]


def run_id(config: RunConfig, algorithm: str) -> str:
    """The run id of one algorithm of a scenario (topics and client ids are rooted at it):
    ``<run.id>-<algorithm>``, or ``<run.name>-<algorithm>`` while no id was chosen."""
    return f"{config.run.id or config.run.name}-{algorithm.replace('_', '-')}"


def with_run_id(config: RunConfig, chosen: str | None = None) -> RunConfig:
    """``config`` with its run id: ``chosen`` (``--run``), the file's, or a fresh
    ``<name>-<6 hex digits>``: two runs of one scenario on one broker never meet."""
    if chosen:
        return config.with_overrides(run={"id": chosen})
    if config.run.id:
        return config
    return config.with_overrides(run={"id": f"{config.run.name}-{secrets.token_hex(3)}"})


class RunLive(EmoError):
    """A run with this id is live on the broker: starting another would take it over."""


async def ensure_not_live(broker: Any, runs: list[str], client: str) -> None:
    """Refuse (:class:`RunLive`) if any node of ``runs`` says it is online on the broker.

    Reads the retained statuses (a node's will turns its own to ``offline`` when it dies):
    publishes nothing on the runs' topics. Every retained status comes with the
    subscription, before a probe we send ourselves after it: when the probe is back, all
    of them are in (no waiting on a clock).
    """
    probe = f"emo-probe/{client}"
    online: list[str] = []
    async with open_bus(broker, client, clean_start=True) as bus:
        for run in runs:
            await bus.subscribe(subscription(Kind.STATUS, run))
        await bus.subscribe(probe)
        await bus.publish(probe, b"probe", qos=1)
        async for message in bus.messages():
            if message.topic == probe:
                break
            try:
                body = json.loads(bytes(message.payload))
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue  # not ours to read: it proves nothing about a live run
            if isinstance(body, dict) and body.get("state") == "online":
                online.append(message.topic)
    if online:
        shown = ", ".join(sorted(online)[:3]) + (" ..." if len(online) > 3 else "")
        raise RunLive(
            f"run {runs[0] if len(runs) == 1 else runs} is live on this broker "
            f"({len(online)} node(s) online: {shown}); choose another --run, or leave out "
            "--run for a fresh id"
        )


def build_node(
    broker: Any,
    config: RunConfig,
    algorithm: str,
    plan: DataPlan,
    node_id: str,
    out_dir: Path | None,
    *,
    checkpoint_dir: Path | None = None,
    bus_options: BusOptions | None = None,
    incarnation: str | None = None,
) -> Node:
    """One node of an algorithm's fleet: ``server``, an overlay or a device id.

    With ``checkpoint_dir``, the server and the overlays checkpoint there
    (``<dir>/<algorithm>/server``, ``<dir>/<algorithm>/<overlay>``) and resume from it.
    With ``incarnation``, the server starts as it and the other nodes take server-side
    messages of it only; without, the server picks one and the others follow the newest
    they see (:mod:`emo_mqtt.incarnation`).
    """
    node = _build_node(
        broker, config, algorithm, plan, node_id, out_dir, checkpoint_dir, bus_options, incarnation
    )
    if incarnation is not None and not isinstance(node, ServerNode):
        node.pin_incarnation(incarnation)
    return node


def _build_node(
    broker: Any,
    config: RunConfig,
    algorithm: str,
    plan: DataPlan,
    node_id: str,
    out_dir: Path | None,
    checkpoint_dir: Path | None,
    bus_options: BusOptions | None,
    incarnation: str | None,
) -> Node:
    run = run_id(config, algorithm)
    ckpt = None if checkpoint_dir is None else checkpoint_dir / algorithm
    if node_id == "server":
        return ServerNode(
            node_bus(broker, run, ServerNode.role, node_id, bus_options),
            config,
            run,
            algorithm,
            plan,
            out_dir=None if out_dir is None else out_dir / algorithm,
            checkpoint_dir=None if ckpt is None else ckpt / "server",
            incarnation=incarnation,
        )
    if node_id in config.overlay_ids():
        spill = None if out_dir is None else out_dir / algorithm / "spill" / node_id
        return OverlayNode(
            node_bus(broker, run, OverlayNode.role, node_id, bus_options),
            config,
            run,
            node_id,
            spill_dir=spill,
            checkpoint_dir=None if ckpt is None else ckpt / node_id,
        )
    return DeviceNode(
        node_bus(broker, run, DeviceNode.role, node_id, bus_options),
        config,
        run,
        node_id,
        algorithm,
        plan.device(node_id),
    )


def fleet_node_ids(config: RunConfig, algorithm: str) -> dict[str, list[str]]:
    """The node ids of one algorithm's fleet by link class (overlays only under EMO)."""
    overlays = config.overlay_ids() if Algorithm.parse(algorithm).uses_overlays else []
    return {"server": ["server"], "overlay": overlays, "device": config.device_ids()}


def build_nodes(
    broker: Any,
    config: RunConfig,
    algorithm: str,
    plan: DataPlan,
    out_dir: Path | None,
    *,
    checkpoint_dir: Path | None = None,
    incarnation: str | None = None,
) -> tuple[ServerNode, list[Node]]:
    """The server and the other nodes of one algorithm's fleet (see :func:`build_node`)."""
    ids = fleet_node_ids(config, algorithm)
    server = build_node(
        broker,
        config,
        algorithm,
        plan,
        "server",
        out_dir,
        checkpoint_dir=checkpoint_dir,
        incarnation=incarnation,
    )
    assert isinstance(server, ServerNode)
    others = [
        build_node(
            broker,
            config,
            algorithm,
            plan,
            n,
            out_dir,
            checkpoint_dir=checkpoint_dir,
            incarnation=incarnation,
        )
        for n in ids["overlay"] + ids["device"]
    ]
    return server, others


async def reset_run(broker: Any, config: RunConfig, algorithm: str) -> None:
    """Start a run clean on a broker that may have seen one with the same id before.

    A finished run leaves retained messages (its round, ``done``, control decisions,
    statuses) and persistent sessions with queued messages; a new run with the same id must
    not take them for its own. What is retained under the run's topics is read first (every
    retained message comes with the subscription, before a probe sent after it) and only
    that is cleared; a node that left a retained status may have left a session, and only
    those clients (and the server's) connect once with a clean start, which drops it. A
    fresh run id costs one connection, whatever the size of the fleet.
    """
    run = run_id(config, algorithm)
    probe = f"emo-probe/{run}-reset"
    found: list[str] = []
    async with open_bus(broker, f"{run}-reset", clean_start=True) as bus:
        await bus.subscribe(run_filter(run))
        await bus.subscribe(probe)
        await bus.publish(probe, b"probe", qos=1)
        async for message in bus.messages():
            if message.topic == probe:
                break
            if message.payload:  # before the probe: retained, no live run publishes here
                found.append(message.topic)
        await bus.unsubscribe(run_filter(run))
        for where in found:
            await bus.publish(where, b"", retain=True)  # an empty retained payload clears it
    clients = {f"{run}-server-server"}
    for where in found:
        try:
            parsed = parse(where)
        except EmoError:
            continue
        if parsed.kind is Kind.STATUS and parsed.node is not None:
            clients.add(f"{run}-{parsed.role}-{parsed.node}")
    gate = asyncio.Semaphore(start_concurrency(len(clients)))

    async def clean(client: str) -> None:
        async with gate, open_bus(broker, client, clean_start=True):
            pass

    await asyncio.gather(*(clean(c) for c in sorted(clients)))


class Monitor:
    """Subscribes to a run's metrics like any dashboard would, and keeps what it needs."""

    def __init__(
        self,
        broker: Any,
        run: str,
        algorithm: str,
        rounds: int,
        say: Say,
        on_event: OnEvent | None = None,
    ) -> None:
        self.on_event = on_event
        #: Round -> bytes published by the run's nodes so far, as seen at the round event.
        self.bytes_at_round: dict[int, int] = {}
        self.bus = open_bus(broker, f"{run}-monitor", clean_start=True)
        self.run = run
        self.algorithm = algorithm
        self.rounds = rounds
        self.say = say
        self.latest: dict[str, dict[str, Any]] = {}
        self.final: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.done: dict[str, Any] | None = None
        #: Metrics messages skipped, by reason (a :data:`~emo_mqtt.telemetry.REASONS`,
        #: ``not_server`` for a round or done event from another role, ``bad_topic``).
        self.skipped: Counter[str] = Counter()
        self._event = asyncio.Event()

    async def start(self) -> None:
        await self.bus.connect()
        await self.bus.subscribe(subscription(Kind.METRICS, self.run))
        self._task = asyncio.create_task(self._loop())

    def _skip(self, reason: str, topic: str, detail: str) -> None:
        """Count a metrics message that is not ours to use (``skipped`` by reason)."""
        self.skipped[reason] += 1
        self.bus.reject("bad_metrics", topic, f"{reason}: {detail}")

    async def _loop(self) -> None:
        async for message in self.bus.messages():
            if not message.payload:
                continue  # a retained topic (final metrics) being cleared: not a message
            # Anyone who may write a metrics topic (every device) may put anything there,
            # retained even: parse it as untrusted input, and only the server's events count.
            try:
                where = parse(message.topic)
                body = parse_metrics(message.payload)
                check_event(body)
            except TelemetryError as exc:
                self._skip(exc.reason, message.topic, str(exc))
                continue
            except EmoError as exc:
                self._skip("bad_topic", message.topic, str(exc))
                continue
            if body.get("event") in REQUIRED_BY_EVENT and where.role != "server":
                self._skip("not_server", message.topic, f"event {body['event']!r}")
                continue
            try:
                self._take(where, body)
            except Exception as exc:  # a bug here must not end the run's only summary feed
                log.exception("monitor: metrics on %s not taken", message.topic)
                self._skip("error", message.topic, repr(exc))

    def _take(self, where: ParsedTopic, body: dict[str, Any]) -> None:
        """Keep one validated metrics message (see :func:`~emo_mqtt.telemetry.parse_metrics`)."""
        node = f"{where.role}/{where.node}"
        self.latest[node] = body
        if body.get("final"):
            self.final[node] = body
        if body.get("event") == "round":
            self.history.append(body)
            self.bytes_at_round[int(body["round"])] = self.bytes_so_far()
            self.say(self._progress(body))
            if self.on_event is not None:
                self.on_event(
                    {
                        "event": "round",
                        "algorithm": self.algorithm,
                        "run": self.run,
                        "round": body["round"],
                        "rounds": self.rounds,
                        "accuracy": body["accuracy"],
                        "fl_accuracy": body["fl_accuracy"],
                        "updates": body.get("updates"),
                        "bytes_so_far": self.bytes_so_far(),
                        "wall_s": body["wall_s"],
                    }
                )
        elif body.get("event") == "done":
            self.done = body
        self._event.set()

    def bytes_so_far(self) -> int:
        return sum(int(m.get("bytes_out", 0)) for m in self.latest.values())

    def _progress(self, body: dict[str, Any]) -> str:
        return progress_line(self.algorithm, self.rounds, body, self.bytes_so_far())

    async def wait_final(self, nodes: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.final) < nodes and time.monotonic() < deadline:
            await wait_event(self._event, 0.5)

    async def close(self) -> None:
        self._task.cancel()
        # Awaited, so that an error of its last moments is never left unretrieved (a
        # "Task exception was never retrieved" traceback on Ctrl-C).
        await asyncio.gather(self._task, return_exceptions=True)
        await self.bus.close()


def _bus_options(config: RunConfig, replay: NetworkReplay, node: str) -> BusOptions:
    """Bus deadlines sized to a shaped node's link and to the outages of the scenario.

    The defaults assume a LAN: a publish fails after 10 s plus 1 s per MB, and a transfer
    whose chunks stop arriving is dropped after 30 s. A node behind a slow link or down for
    a minute must neither give up its own update nor drop a peer's half-received message.
    """
    links = [replay.conditions[node]]
    links += [e.conditions for e in replay.timeline if e.node == node and e.conditions is not None]
    rates = [link.up_mbps for link in links if link.up_mbps is not None]
    min_rate = 1_000_000.0 if not rates else min(1_000_000.0, min(rates) * MBPS / 2)
    return BusOptions(
        publish_timeout_s=max(
            10.0, replay.longest_outage_s(node) + 20.0, config.fleet.round_deadline_s
        ),
        min_rate_bytes_s=min_rate,
        reassembly_timeout_s=max(30.0, replay.longest_outage_s() + 30.0),
        first_connect_timeout_s=replay.horizon_s,
    )


async def _until_connected(
    nodes: list[Node], skip: set[str], tasks: dict[str, asyncio.Task[None]], limit_s: float
) -> None:
    """Wait until every node but ``skip`` has connected once (failing if a node fails)."""
    deadline = time.monotonic() + limit_s
    while any(not n.bus.connected for n in nodes if n.node_id not in skip):
        _failed(tasks)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fleet did not connect within {limit_s:g} s")
        await asyncio.sleep(0.01)


def _failed(tasks: dict[str, asyncio.Task[None]]) -> None:
    """Raise if a node's task ended with an error (a crash the scenario made is a cancel)."""
    for name, task in tasks.items():
        if task.done() and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            raise EmoError(f"{name} failed: {exc!r}") from exc


async def _supervise(
    server_task: asyncio.Task[None], tasks: dict[str, asyncio.Task[None]], limit_s: float
) -> None:
    """Wait for the server to finish the run; fail as soon as any node fails.

    A device or overlay whose loop died would otherwise leave the run to limp on, its rounds
    closing at their deadlines, and end with exit status 0.
    """
    deadline = time.monotonic() + limit_s
    while not server_task.done():
        _failed(tasks)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the run did not end within {limit_s:g} s")
        await asyncio.wait(
            [server_task, *(t for t in tasks.values() if not t.done())],
            timeout=min(left, 1.0),
            return_when=asyncio.FIRST_COMPLETED,
        )
    server_task.result()  # the server's own error, if any
    _failed(tasks)


def _check_workers(broker: Any, config: RunConfig) -> None:
    """Refuse (one clear line) what worker processes cannot run."""
    if not isinstance(broker, str):
        raise ConfigError(
            "--workers runs nodes in other processes: they need an MQTT broker (emo run "
            "starts one), not the in-memory bus"
        )
    if config.network.enabled:
        raise ConfigError(
            "--workers does not run scenarios with a [network] section yet (the shaping "
            "proxies and the timeline live in one process): use --workers 0"
        )


def _worker_specs(
    config: RunConfig,
    algorithm: str,
    ids: dict[str, list[str]],
    workers: int,
    brokers: BrokerMap,
    incarnation: str,
    out_dir: Path | None,
    origin: float,
) -> list[Any]:
    """One :class:`~emo_mqtt.workers.WorkerSpec` per worker (plain data only)."""
    from emo_mqtt.workers import WorkerSpec

    shares = [s for s in assign(ids["overlay"], ids["device"], workers) if s]
    # The cores are shared by the workers: each trains one device at a time with one torch
    # thread, unless there are more training slots than workers.
    per_worker = max(1, config.fleet.parallel_training // len(shares))
    return [
        WorkerSpec(
            index=i,
            config=config.to_dict(),
            source=config.source,
            algorithm=algorithm,
            nodes=tuple(share),
            brokers=brokers,
            incarnation=incarnation,
            out_dir=None if out_dir is None else str(out_dir),
            log_origin=origin,
            parallel_training=per_worker,
            log_level=logging.getLogger("emo_mqtt").getEffectiveLevel(),
        )
        for i, share in enumerate(shares)
    ]


async def run_algorithm(
    broker: Any,
    config: RunConfig,
    algorithm: str,
    plan: DataPlan,
    *,
    out_dir: Path | None = None,
    say: Say = print,
    on_event: OnEvent | None = None,
    sites: SiteBrokers | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Run one algorithm's fleet to completion; its summary entry.

    With ``sites`` (``--topology sites``), ``broker`` is the cloud broker: the server talks
    to it, and the other nodes to their site's broker (``sites.topology.broker_for``);
    the entry gains ``bridge``, the bytes that crossed the bridges meanwhile.

    With a ``[network]`` section, every node reaches the broker through its own shaping
    proxy (:class:`~emo_mqtt.netreplay.NetworkReplay`) and the scenario's timeline is replayed
    from the moment the nodes are connected. With ``out_dir``, the message log is written to
    ``<out_dir>/<algorithm>/messages.csv``. With ``workers`` > 0, the devices and overlays
    run in that many worker processes (:mod:`emo_mqtt.workers`), the server in this one.
    """
    if workers > 0:
        _check_workers(broker, config)
    run = run_id(config, algorithm)
    # Before anything of ours is published: a live run of this id would be taken over.
    await ensure_not_live(broker, [run], f"{run}-check-{secrets.token_hex(3)}")
    await reset_run(broker, config, algorithm)
    #: This start of the run: its nodes take server-side messages of it only, so a retained
    #: ``done`` or round restored by a crashed broker cannot end or steer it.
    incarnation = new_incarnation()
    limit = config.run.rounds * config.fleet.round_deadline_s * 2 + 120
    ids = fleet_node_ids(config, algorithm)
    tasks: dict[str, asyncio.Task[None]] = {}
    #: Nodes behind each task (a worker's task runs many): who owes a final metrics message.
    weight: dict[str, int] = {}
    msglog = MessageLog(origin=time.monotonic())
    gate = asyncio.Semaphore(start_concurrency(1 + len(ids["overlay"]) + len(ids["device"])))
    replay: NetworkReplay | None = None
    checkpoint_dir: Path | None = None

    def broker_of(node_id: str) -> Any:
        """The broker (URL) ``node_id`` connects to: its proxy's, its site's, or ``broker``."""
        if replay is not None:
            return replay.url(node_id)
        return broker if sites is None else sites.topology.broker_for(node_id)

    def make(node_id: str) -> Node:
        node = build_node(
            broker_of(node_id),
            config,
            algorithm,
            plan,
            node_id,
            out_dir,
            # Only overlays need one: a restarted overlay resumes its model and cache.
            checkpoint_dir=checkpoint_dir if node_id in ids["overlay"] else None,
            bus_options=(
                _bus_options(config, replay, node_id)
                if replay is not None
                else BusOptions(publish_timeout_s=FLEET_PUBLISH_TIMEOUT_S)
                if workers
                else None
            ),
            incarnation=incarnation,
        )
        node.bus.on_published = msglog.recorder(node_id)
        node.start_gate = gate
        return node

    def launch(node: Node) -> None:
        tasks[node.node_id] = asyncio.create_task(
            node.run_node(), name=f"{node.role}:{node.node_id}"
        )

    async def crash(node_id: str) -> None:
        say(f"[{algorithm:>7}] network: {node_id} crashes")
        task = tasks[node_id]
        while not task.done():  # cancel again whatever goodbye its finally block attempts
            task.cancel()
            await asyncio.sleep(0.01)

    async def restart(node_id: str) -> None:
        say(f"[{algorithm:>7}] network: {node_id} restarts")
        launch(make(node_id))

    if config.network.enabled and sites is not None:
        raise ConfigError("[network] shaping and --topology sites do not combine yet")
    bridge_before = None if sites is None else sites.bridge_counts()
    if config.network.enabled:
        if not isinstance(broker, str):
            raise ConfigError(
                "[network] shapes real TCP connections: run it against an MQTT "
                "broker (emo run starts one), not the in-memory bus"
            )
        replay = NetworkReplay(
            config.network,
            broker,
            ids,
            seed=config.run.seed,
            horizon_s=limit,
            on_crash=crash,
            on_restart=restart,
        )
        if out_dir is not None and any(e.action == "restart" for e in replay.timeline):
            checkpoint_dir = out_dir / "checkpoints"  # a restarted overlay resumes from it
            # ... from this run's checkpoint, never from one an earlier run left in --out.
            shutil.rmtree(checkpoint_dir / algorithm, ignore_errors=True)
        await replay.start()
    monitor = Monitor(broker, run, algorithm, config.run.rounds, say, on_event)
    timeline: asyncio.Task[None] | None = None
    try:
        server = make("server")
        assert isinstance(server, ServerNode)
        if replay is not None:
            server.skip_start_wait = replay.down_at_start()
        others = [] if workers else [make(n) for n in ids["overlay"] + ids["device"]]
        await monitor.start()
        start = msglog.origin = time.monotonic()
        for node in others:
            launch(node)
        if workers:
            from emo_mqtt.workers import run_worker

            # Workers start (a fresh interpreter, torch, the data) and connect their share
            # of the fleet, paced: the server's start wait grows with the fleet.
            server.start_timeout_s = max(server.start_timeout_s, 60.0 + 0.05 * len(ids["device"]))
            # Each node's broker as broker_of says (its site's under --topology sites).
            nodes = ids["overlay"] + ids["device"]
            routes = {n: str(broker_of(n)) for n in nodes}
            brokers = BrokerMap(str(broker), {n: u for n, u in routes.items() if u != broker})
            for spec in _worker_specs(
                config, algorithm, ids, workers, brokers, incarnation, out_dir, start
            ):
                name = f"worker-{spec.index}"
                weight[name] = len(spec.nodes)
                tasks[name] = asyncio.create_task(run_worker(spec, msglog), name=name)
        server_task = tasks["server"] = asyncio.create_task(server.run_node(), name="server")
        if replay is not None:
            # The timeline counts from the moment the fleet is connected, not from the moment
            # its tasks were created: on a loaded machine connecting takes seconds, and a cut
            # meant for a node's upload would land on its first connection attempt instead.
            await _until_connected([server, *others], replay.down_at_start(), tasks, limit)
            start = msglog.origin = time.monotonic()
            timeline = asyncio.create_task(replay.run_timeline(start), name="network-timeline")
        await _supervise(server_task, tasks, limit)
        wall = time.monotonic() - start
        if timeline is not None:
            timeline.cancel()
        if replay is not None:
            replay.end(wall)
        rest = [t for n, t in tasks.items() if n != "server"]
        done, pending = await asyncio.wait(rest, timeout=config.fleet.round_deadline_s)
        for task in pending:
            log.warning("%s did not stop after the run; cancelling it", task.get_name())
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise EmoError(f"{task.get_name()} failed: {task.exception()!r}")
        alive = sum(weight.get(t.get_name(), 1) for t in done if not t.cancelled())
        await monitor.wait_final(alive + 1, timeout_s=10)
    finally:
        if timeline is not None:
            timeline.cancel()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(
            *tasks.values(), *([timeline] if timeline else []), return_exceptions=True
        )
        await monitor.close()
        if replay is not None:
            await replay.close()
        if out_dir is not None:
            await asyncio.to_thread(msglog.write_csv, out_dir / algorithm / "messages.csv")
    # Round times count from round 1; the summary counts from the start of the run.
    offset = 0.0 if server.rounds_started_at is None else server.rounds_started_at - start
    entry = summarize(algorithm, config, monitor, server, wall, offset_s=offset)
    if sites is not None and bridge_before is not None:
        entry["bridge"] = counts_since(sites.bridge_counts(), bridge_before)
    entry["logged_messages"] = len(msglog.rows)
    entry["logged_bytes"] = msglog.total_bytes
    if replay is not None:
        links = replay.stats()
        # What the proxies carried: MQTT framing, acknowledgements and retransmitted
        # frames included, so a little more than ``bytes`` (payloads) each way.
        entry["network"] = {
            "events": replay.applied,
            "links": links,
            "wire_bytes_up": sum(link["bytes_up"] for link in links.values()),
            "wire_bytes_down": sum(link["bytes_down"] for link in links.values()),
        }
    return entry


def summarize(
    algorithm: str,
    config: RunConfig,
    monitor: Monitor,
    server: ServerNode,
    wall: float,
    *,
    offset_s: float = 0.0,
) -> dict[str, Any]:
    """One algorithm's entry of summary.json, from what the nodes published.

    ``offset_s``: seconds from the start of the run to the start of round 1 (the server's
    start wait), added to the server's round times so that every time in the entry counts
    from the start of the run.
    """
    if monitor.done is None:
        raise EmoError(f"{algorithm}: the server never reported the end of the run")
    by_kind: dict[str, int] = {}
    for metrics in monitor.final.values():
        for kind, count in metrics.get("bytes_out_by_kind", {}).items():
            by_kind[kind] = by_kind.get(kind, 0) + int(count)
    rejected: dict[str, int] = {}
    for metrics in monitor.final.values():
        for reason, count in metrics.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + int(count)
    history = sorted(monitor.history, key=lambda h: int(h["round"]))
    done = monitor.done
    target = config.run.target_accuracy
    reached = next((h for h in history if h["accuracy"] >= target), None)
    times = [round(float(h["wall_s"]) + offset_s, 3) for h in history]
    to_final = done.get("train_wall_s")
    return {
        "accuracy": done["accuracy"],
        "fl_accuracy": done["fl_accuracy"],
        # The algorithm's own final model alone (FL: the FL model; SplitFed: the split
        # model), calibrated on the server's validation split as EMO's ensemble is; for EMO,
        # whose ensemble is calibrated already, its accuracy. fl_calibrated_accuracy: the FL
        # model of this run, calibrated the same way.
        "calibrated_accuracy": (
            done["accuracy"]
            if Algorithm.parse(algorithm).uses_overlays
            else done.get("fl_calibrated_accuracy")
        ),
        "fl_calibrated_accuracy": done.get("fl_calibrated_accuracy"),
        "params": params_of(config, algorithm),
        "activations": activation_counts(monitor.final),
        "member_accuracy": done.get("member_accuracy"),
        "accuracy_per_round": [h["accuracy"] for h in history],
        "fl_accuracy_per_round": [h["fl_accuracy"] for h in history],
        # Seconds from the start of the run to the close of each round: real time, with the
        # network shaped in real time when the scenario has a [network] section.
        "time_per_round_s": times,
        # Bytes published by the run's nodes when each round closed, as the monitor saw them
        # in the nodes' latest metrics (a node's figure lags by at most one metrics message).
        "bytes_per_round": [monitor.bytes_at_round.get(int(h["round"])) for h in history],
        "bytes": sum(by_kind.values()),
        "bytes_by_kind": dict(sorted(by_kind.items())),
        "wall_s": round(wall, 3),
        # Training time as the fleet experienced it, from the start of the run to the close
        # of the last round: the proxies delay bytes in real time, so it is measured, not
        # modelled. wall_s goes on to the end (overlays' final models, final evaluation).
        "sim_time_s": times[-1] if times else round(wall, 3),
        # From the start of the run to the final accuracy: the last round, then the wait
        # for the overlays' last models and the final evaluation (what a user waits for).
        "time_to_final_s": (
            round(float(to_final) + offset_s, 3) if to_final is not None else round(wall, 3)
        ),
        "network_shaped": config.network.enabled,
        "rounds": len(history),
        "target_accuracy": target,
        "time_to_target_s": None if reached is None else round(reached["wall_s"] + offset_s, 3),
        "nodes_reporting": len(monitor.final),
        "rejected": rejected,
        # Overlays whose models were refused as poisoned (non-finite), by times refused.
        "poisoned_overlays": done.get("poisoned_overlays") or {},
        "fl_model_sha256": done["fl_model_sha256"],
        "controller_decisions": server.decisions if _decides(algorithm) else [],
        "overlay_cache": overlay_cache_totals(monitor.final),
    }


def _decides(algorithm: str) -> bool:
    """Whether the server's per-device decisions are worth keeping in the summary."""
    parsed = Algorithm.parse(algorithm)
    return parsed.controlled or parsed.fixed_rule


#: Overlay counters summed into ``overlay_cache`` (what the replay cache and its spill tier did).
_CACHE_COUNTERS = ("offered", "evicted", "purged", "refilled", "sampled_entries", "spilled")
_SPILL_COUNTERS = (
    "spill_entries_written",
    "spill_entries_taken",
    "spill_entries_dropped",
    "spill_bytes",
    "spill_blocks",
)


def overlay_cache_totals(final: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The overlays' replay-cache and spill-tier counters, summed over the overlays, from
    their final metrics (all zero without overlays). ``spill_entries_written`` > 0 means
    capacity evictions went to disk; ``spill_entries_taken`` that replay read them back."""
    out = {k: 0 for k in (*_CACHE_COUNTERS, *_SPILL_COUNTERS)}
    for node, metrics in final.items():
        if not node.startswith("overlay/"):
            continue
        stats = metrics.get("cache_stats") or {}
        for k in _CACHE_COUNTERS:
            out[k] += int(stats.get(k, 0))
        for k in _SPILL_COUNTERS:
            out[k] += int(metrics.get(k, 0))
    return out


def best_fixed_rule(algorithms: dict[str, dict[str, Any]]) -> str | None:
    """The controller's strongest ablation that ran: of ``emo_int8`` and ``emo_fixed``, the
    more accurate, the fewer activation bytes on a tie (None when neither ran)."""
    ran = [a for a in Algorithm if a.fixed_rule and a.value in algorithms]
    if not ran:
        return None
    best = max(
        ran,
        key=lambda a: (
            algorithms[a.value]["accuracy"],
            -algorithms[a.value]["bytes_by_kind"].get("activations", 0),
        ),
    )
    return best.value


def fixed_rule_comparisons(algorithms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The convergence-aware controller (``emo``) against its best fixed rule.

    ``controller_vs_best_fixed_bytes``: emo's activation bytes over the best fixed rule's
    (below 1: the controller sends less); ``controller_vs_best_fixed_points``: emo's
    accuracy minus the best fixed rule's, in points (negative: the controller is worse).
    """
    emo, best = algorithms.get("emo"), best_fixed_rule(algorithms)
    if emo is None or best is None:
        return {}
    fixed = algorithms[best]
    act = emo["bytes_by_kind"].get("activations", 0)
    act_fixed = fixed["bytes_by_kind"].get("activations", 0)
    return {
        "best_fixed_rule": best,
        "controller_vs_best_fixed_bytes": round(act / act_fixed, 4) if act_fixed else None,
        "controller_vs_best_fixed_points": round(100 * (emo["accuracy"] - fixed["accuracy"]), 2),
    }


def params_of(config: RunConfig, algorithm: str) -> dict[str, int]:
    """Trainable parameters by where they live: ``device`` (the model each device trains),
    ``server`` (what the server trains: SplitFed's server half) and ``overlay`` (every
    overlay model together)."""
    algo = Algorithm.parse(algorithm)
    with torch.random.fork_rng(devices=[]):  # never moves the RNG nodes initialise from
        fl = build_fl_model(config.fl.model)
        overlay = build_overlay_model(config.emo.overlay_model, fl.activation_shape)
    if algo.is_split:
        return {"device": param_count(fl.trunk), "server": param_count(overlay), "overlay": 0}
    overlays = config.fleet.overlays if algo.uses_overlays else 0
    return {"device": param_count(fl), "server": 0, "overlay": overlays * param_count(overlay)}


#: Device counters of activation samples (see DeviceNode), summed into ``activations``.
ACTIVATION_COUNTERS = ("captured", "published", "evicted", "dropped", "duplicates")


def activation_counts(final: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Activation samples captured, published, evicted from the outbox, dropped unsent and
    repeated within a round, summed over the devices' final metrics."""
    return {
        name: sum(
            int(m.get(f"activations_{name}", 0))
            for node, m in final.items()
            if node.startswith("device/")
        )
        for name in ACTIVATION_COUNTERS
    }


def time_to(entry: dict[str, Any], accuracy: float) -> float | None:
    """Seconds until the first round whose accuracy reached ``accuracy`` (None: never)."""
    for acc, t in zip(entry["accuracy_per_round"], entry["time_per_round_s"], strict=True):
        if acc >= accuracy:
            return float(t)
    return None


def comparisons(algorithms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline ratios between algorithms that ran."""
    out: dict[str, Any] = {}
    fl, sfl, emo, full = (algorithms.get(k) for k in ("fl", "sfl", "emo", "emo_all"))
    if fl and emo:
        out["emo_minus_fl_points"] = round(100 * (emo["accuracy"] - fl["accuracy"]), 2)
        if fl.get("calibrated_accuracy") is not None:
            # Against FL calibrated as EMO's ensemble is (the same validation data).
            out["emo_minus_fl_calibrated_points"] = round(
                100 * (emo["accuracy"] - fl["calibrated_accuracy"]), 2
            )
        out["fl_model_identical_with_overlays"] = fl["fl_model_sha256"] == emo["fl_model_sha256"]
    if sfl and emo:
        out["sfl_bytes_over_emo_bytes"] = round(sfl["bytes"] / emo["bytes"], 2)
        # Time to each one's final accuracy (EMO's includes the wait for the overlays'
        # last models); the ratio of the round-close times is kept beside it.
        out["sfl_time_over_emo_time"] = round(_final_time(sfl) / _final_time(emo), 2)
        out["sfl_sim_time_over_emo_sim_time"] = round(sfl["sim_time_s"] / emo["sim_time_s"], 2)
        s_t, e_t = sfl["time_to_target_s"], emo["time_to_target_s"]
        out["sfl_time_to_target_over_emo"] = (
            round(s_t / e_t, 2) if s_t is not None and e_t is not None and e_t > 0 else None
        )
        # The same accuracy for both: the best per-round accuracy the weaker of the two reached.
        common = min(
            max(sfl["accuracy_per_round"], default=0.0), max(emo["accuracy_per_round"], default=0.0)
        )
        s_c, e_c = time_to(sfl, common), time_to(emo, common)
        out["common_accuracy"] = round(common, 4)
        out["sfl_time_to_common_over_emo"] = (
            round(s_c / e_c, 2) if s_c is not None and e_c is not None and e_c > 0 else None
        )
    if emo and full:
        act = emo["bytes_by_kind"].get("activations", 0)
        act_full = full["bytes_by_kind"].get("activations", 0)
        saved = round(1 - act / act_full, 4) if act_full else None
        out["controller_activation_bytes_saved"] = saved
        out["controller_total_bytes_saved"] = round(1 - emo["bytes"] / full["bytes"], 4)
        out["controller_accuracy_cost_points"] = round(
            100 * (full["accuracy"] - emo["accuracy"]), 2
        )
    out.update(fixed_rule_comparisons(algorithms))
    return out


def _final_time(entry: dict[str, Any]) -> float:
    """Seconds to an entry's final accuracy (``sim_time_s`` for an entry without it)."""
    return float(entry.get("time_to_final_s") or entry["sim_time_s"])


def table(algorithms: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed at the end of ``emo run``."""
    target = next(iter(algorithms.values()))["target_accuracy"] if algorithms else 0.0
    lines = [
        f"{'algorithm':10} {'accuracy':>9} {'FL model':>9} {'MB sent':>9} "
        f"{'activ. MB':>10} {'time s':>8} {'final s':>8} {f'to {target:g} s':>10} {'rounds':>7}"
    ]
    for name, a in algorithms.items():
        reach = a["time_to_target_s"]
        lines.append(
            f"{name:10} {a['accuracy']:9.4f} {a['fl_accuracy']:9.4f} {a['bytes'] / 1e6:9.2f} "
            f"{a['bytes_by_kind'].get('activations', 0) / 1e6:10.2f} {a['sim_time_s']:8.1f} "
            f"{_final_time(a):8.1f} "
            f"{'never' if reach is None else f'{reach:.1f}':>10} {a['rounds']:7d}"
        )
    return "\n".join(lines)


def _train_a_little(config: RunConfig, data: Split) -> None:
    model = build_fl_model(config.fl.model)
    train_local(
        model,
        data,
        epochs=1,
        batch_size=config.fl.batch_size,
        lr=config.fl.lr,
        generator=make_generator(0, "warm-up"),
    )


async def warm_up(config: RunConfig, plan: DataPlan) -> None:
    """Train a few batches once in every compute worker before the first algorithm.

    torch's first training in a thread pays one-time costs (kernel selection, allocator
    set-up) of about a second here: billed to the first algorithm's devices, and multiplied
    by a slow ``compute_speed``, it would make that algorithm's first round seconds long.
    """
    first = next(iter(plan.devices.values()))  # a worker's plan holds its own devices only
    n = min(len(first), 4 * config.fl.batch_size)
    data = Split(first.x[:n], first.y[:n])
    await asyncio.gather(
        *(
            compute.compute(_train_a_little, config, data)
            for _ in range(config.fleet.parallel_training)
        )
    )


class Interrupted(EmoError):
    """``emo run`` was interrupted; ``summary`` holds what finished (already written)."""

    def __init__(self, summary: dict[str, Any]) -> None:
        cut = summary["interrupted"]
        super().__init__(
            f"interrupted during {cut['algorithm']} at round {cut['last_round']}/{cut['rounds']}"
        )
        self.summary = summary


def _summary(
    config: RunConfig, algorithms: dict[str, dict[str, Any]], kept: list[str] | None = None
) -> dict[str, Any]:
    summary = {
        "scenario": config.source,
        "run_id": config.run.id,
        "state": "finished",
        "config": config.to_dict(),
        "algorithms": algorithms,
        "comparisons": comparisons(algorithms),
    }
    if kept:  # --resume: these finished in an earlier run of this directory (another run id)
        summary["kept_from_earlier_run"] = kept
    return summary


def _write_outputs(summary: dict[str, Any], out_dir: Path, *, report: bool = True) -> list[Path]:
    """Write summary.json, then report.md and its plots (unless not ``report``: nothing
    finished to report on); the report's paths."""
    from emo_mqtt.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not report:
        return []
    try:
        return write_report(summary, out_dir)
    except ImportError as exc:  # matplotlib is a dependency; a broken install loses plots
        log.warning("no plots or report.md: %s (pip install matplotlib)", exc)
        return []


async def run_scenario(
    broker: Any,
    config: RunConfig,
    out_dir: Path | None,
    say: Say = print,
    on_event: OnEvent | None = None,
    keep: dict[str, dict[str, Any]] | None = None,
    *,
    sites: SiteBrokers | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Run every algorithm of ``config`` on the same data split and seed; the summary.

    With ``sites``, ``broker`` is their cloud broker (see :func:`run_algorithm`).
    ``workers`` > 0: the devices and overlays run in that many worker processes
    (:mod:`emo_mqtt.workers`); 0: every node in this process.

    With ``out_dir``, writes summary.json there, and the plots and report.md beside it
    (:func:`emo_mqtt.report.write_report`). ``on_event`` receives a dict per round of each
    algorithm and a last one (``"event": "done"``) with the paths written. ``keep``: the
    entries of algorithms that finished in an earlier run (``--resume``): not run again,
    listed in the summary as they were (those not in ``run.algorithms`` after the others).
    """
    keep = dict(keep or {})
    kept = list(keep)
    config = with_run_id(config)
    if workers > 0:
        _check_workers(broker, config)
    runs = [run_id(config, a) for a in config.run.algorithms]
    await ensure_not_live(broker, runs, f"{config.run.id}-check-{secrets.token_hex(3)}")
    say(f"run: {config.run.id} (topics emo/{runs[0]}/...)")
    compute.configure(config.fleet.parallel_training)
    plan = plan_data(config)
    await warm_up(config, plan)
    say(
        f"data: {len(plan.devices)} devices x ~{len(next(iter(plan.devices.values())))} samples "
        f"({config.data.partition}, alpha={config.data.alpha}), "
        f"{len(plan.validation)} validation, {len(plan.test)} test"
    )
    algorithms: dict[str, dict[str, Any]] = {}
    last_round: dict[str, int] = {}

    def seen(event: dict[str, Any]) -> None:
        last_round[str(event["algorithm"])] = int(event["round"])
        if on_event is not None:
            on_event(event)

    current = ""
    try:
        for current in config.run.algorithms:
            if current in keep:
                say(f"== {current}: finished in the earlier run (--resume), kept")
                algorithms[current] = keep.pop(current)
                continue
            overlays = Algorithm.parse(current).uses_overlays
            say(
                f"== {current}: {config.fleet.devices} devices"
                + (f", {config.fleet.overlays} overlays" if overlays else "")
                + (f" in {workers} worker processes" if workers else "")
            )
            algorithms[current] = await run_algorithm(
                broker,
                config,
                current,
                plan,
                out_dir=out_dir,
                say=say,
                on_event=seen,
                sites=sites,
                workers=workers,
            )
    except asyncio.CancelledError:
        # Interrupted (emo run cancels us on SIGINT/SIGTERM): what finished is kept, the
        # algorithm that was running is marked with the last round it closed.
        algorithms.update(keep)
        summary = _summary(config, algorithms, kept)
        summary["state"] = "interrupted"
        summary["interrupted"] = {
            "algorithm": current,
            "last_round": last_round.get(current, 0),
            "rounds": config.run.rounds,
            "not_started": [
                a
                for a in config.run.algorithms[config.run.algorithms.index(current) + 1 :]
                if a not in keep
            ],
        }
        if out_dir is not None:
            await asyncio.to_thread(_write_outputs, summary, out_dir, report=bool(algorithms))
        raise Interrupted(summary) from None
    algorithms.update(keep)  # finished earlier, not asked for this time: still reported
    summary = _summary(config, algorithms, kept)
    written: list[Path] = []
    if out_dir is not None:
        # Files and plots from a worker thread: the event loop never waits on the disk.
        written = await asyncio.to_thread(_write_outputs, summary, out_dir)
        if written:
            say(f"report: {out_dir / 'report.md'} and {len(written) - 1} plots")
    if on_event is not None:
        on_event(
            {
                "event": "done",
                "summary": None if out_dir is None else str(out_dir / "summary.json"),
                "report": [str(p) for p in written],
                "algorithms": {
                    name: {
                        "accuracy": a["accuracy"],
                        "fl_accuracy": a["fl_accuracy"],
                        "bytes": a["bytes"],
                        "wall_s": a["wall_s"],
                        "sim_time_s": a["sim_time_s"],
                        "time_to_final_s": a["time_to_final_s"],
                        "time_to_target_s": a["time_to_target_s"],
                    }
                    for name, a in algorithms.items()
                },
                "comparisons": summary["comparisons"],
            }
        )
    return summary
