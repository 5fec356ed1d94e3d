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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emo_mqtt.bus import open_bus
from emo_mqtt.config import RunConfig
from emo_mqtt.dataplan import DataPlan, plan_data
from emo_mqtt.errors import EmoError
from emo_mqtt.nodes import compute
from emo_mqtt.nodes.base import Node, wait_event
from emo_mqtt.nodes.device import DeviceNode
from emo_mqtt.nodes.overlay import OverlayNode
from emo_mqtt.nodes.server import ServerNode
from emo_mqtt.topics import Kind, parse, subscription, topic

log = logging.getLogger("emo_mqtt.fleet")

Say = Callable[[str], None]
#: Receives one JSON-ready dict per progress event (``emo run --jsonl``).
OnEvent = Callable[[dict[str, Any]], None]


def run_id(config: RunConfig, algorithm: str) -> str:
    """The run id of one algorithm of a scenario (topics are rooted at it)."""
    return f"{config.run.name}-{algorithm.replace('_', '-')}"


def build_nodes(
    broker: Any, config: RunConfig, algorithm: str, plan: DataPlan, out_dir: Path | None,
    *, checkpoint_dir: Path | None = None,
) -> tuple[ServerNode, list[Node]]:
    """The server and the other nodes of one algorithm's fleet.

    With ``checkpoint_dir``, the server and the overlays checkpoint there
    (``<dir>/<algorithm>/server``, ``<dir>/<algorithm>/<overlay>``) and resume from it.
    """
    run = run_id(config, algorithm)
    ckpt = None if checkpoint_dir is None else checkpoint_dir / algorithm
    server = ServerNode(broker, config, run, algorithm, plan,
                        out_dir=None if out_dir is None else out_dir / algorithm,
                        checkpoint_dir=None if ckpt is None else ckpt / "server")
    others: list[Node] = []
    if algorithm in ("emo", "emo_all"):
        for overlay in config.overlay_ids():
            spill = None if out_dir is None else out_dir / algorithm / "spill" / overlay
            others.append(OverlayNode(broker, config, run, overlay, spill_dir=spill,
                                      checkpoint_dir=None if ckpt is None else ckpt / overlay))
    for device in config.device_ids():
        others.append(DeviceNode(broker, config, run, device, algorithm, plan.device(device)))
    return server, others


async def reset_run(broker: Any, config: RunConfig, algorithm: str) -> None:
    """Start a run clean on a broker that may have seen one with the same id before.

    A finished run leaves retained messages (its round, ``done``, control decisions,
    statuses) and persistent sessions with queued messages; a new run with the same id must
    not take them for its own. Every node's client id connects once with a clean start
    (which drops its old session) and the run's retained topics are cleared.
    """
    run = run_id(config, algorithm)
    server, others = ["server"], config.device_ids()
    overlays = config.overlay_ids() if algorithm in ("emo", "emo_all") else []
    clients = [f"{run}-server-server"] + [f"{run}-device-{d}" for d in others]
    clients += [f"{run}-overlay-{o}" for o in overlays]
    for client in clients:
        async with open_bus(broker, client, clean_start=True):
            pass
    retained = [topic(Kind.SERVER_ROUND, run), topic(Kind.SERVER_DONE, run)]
    retained += [topic(Kind.CONTROL, run, node=d) for d in others]
    retained += [topic(Kind.STATUS, run, node=n, role="device") for n in others]
    retained += [topic(Kind.STATUS, run, node=n, role="overlay") for n in overlays]
    retained += [topic(Kind.STATUS, run, node=n, role="server") for n in server]
    async with open_bus(broker, f"{run}-reset", clean_start=True) as bus:
        for where in retained:
            await bus.publish(where, b"", retain=True)  # an empty retained payload clears it


class Monitor:
    """Subscribes to a run's metrics like any dashboard would, and keeps what it needs."""

    def __init__(self, broker: Any, run: str, algorithm: str, rounds: int, say: Say,
                 on_event: OnEvent | None = None) -> None:
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
        self._event = asyncio.Event()

    async def start(self) -> None:
        await self.bus.connect()
        await self.bus.subscribe(subscription(Kind.METRICS, self.run))
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        async for message in self.bus.messages():
            try:
                where = parse(message.topic)
                body = json.loads(bytes(message.payload))
            except (EmoError, ValueError) as exc:
                self.bus.reject("bad_metrics", message.topic, str(exc))
                continue
            node = f"{where.role}/{where.node}"
            self.latest[node] = body
            if body.get("final"):
                self.final[node] = body
            if body.get("event") == "round":
                self.history.append(body)
                self.bytes_at_round[int(body["round"])] = self.bytes_so_far()
                self.say(self._progress(body))
                if self.on_event is not None:
                    self.on_event({
                        "event": "round", "algorithm": self.algorithm, "run": self.run,
                        "round": body["round"], "rounds": self.rounds,
                        "accuracy": body["accuracy"], "fl_accuracy": body["fl_accuracy"],
                        "updates": body.get("updates"), "bytes_so_far": self.bytes_so_far(),
                        "wall_s": body["wall_s"],
                    })
            elif body.get("event") == "done":
                self.done = body
            self._event.set()

    def bytes_so_far(self) -> int:
        return sum(int(m.get("bytes_out", 0)) for m in self.latest.values())

    def _progress(self, body: dict[str, Any]) -> str:
        line = (f"[{self.algorithm:>7}] round {body['round']:>3}/{self.rounds}  "
                f"acc {body['accuracy']:.4f}")
        if body["accuracy"] != body["fl_accuracy"]:
            line += f" (FL model {body['fl_accuracy']:.4f})"
        line += f"  updates {body['updates']}  {self.bytes_so_far() / 1e6:8.2f} MB  "
        return line + f"{body['wall_s']:7.1f} s"

    async def wait_final(self, nodes: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.final) < nodes and time.monotonic() < deadline:
            await wait_event(self._event, 0.5)

    async def close(self) -> None:
        self._task.cancel()
        await self.bus.close()


async def run_algorithm(
    broker: Any,
    config: RunConfig,
    algorithm: str,
    plan: DataPlan,
    *,
    out_dir: Path | None = None,
    say: Say = print,
    on_event: OnEvent | None = None,
) -> dict[str, Any]:
    """Run one algorithm's fleet to completion; its summary entry."""
    run = run_id(config, algorithm)
    await reset_run(broker, config, algorithm)
    server, others = build_nodes(broker, config, algorithm, plan, out_dir)
    monitor = Monitor(broker, run, algorithm, config.run.rounds, say, on_event)
    await monitor.start()
    start = time.monotonic()
    tasks = [asyncio.create_task(n.run_node(), name=f"{n.role}:{n.node_id}") for n in others]
    server_task = asyncio.create_task(server.run_node(), name="server")
    limit = config.run.rounds * config.fleet.round_deadline_s * 2 + 120
    try:
        await asyncio.wait_for(asyncio.shield(server_task), timeout=limit)
        wall = time.monotonic() - start
        done, pending = await asyncio.wait(tasks, timeout=config.fleet.round_deadline_s)
        for task in pending:
            log.warning("%s did not stop after the run; cancelling it", task.get_name())
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise EmoError(f"{task.get_name()} failed: {task.exception()!r}")
        await monitor.wait_final(len(others) + 1, timeout_s=10)
    finally:
        for task in [*tasks, server_task]:
            task.cancel()
        await asyncio.gather(*tasks, server_task, return_exceptions=True)
        await monitor.close()
    return summarize(algorithm, config, monitor, server, wall)


def summarize(
    algorithm: str, config: RunConfig, monitor: Monitor, server: ServerNode, wall: float
) -> dict[str, Any]:
    """One algorithm's entry of summary.json, from what the nodes published."""
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
    return {
        "accuracy": done["accuracy"],
        "fl_accuracy": done["fl_accuracy"],
        "member_accuracy": done.get("member_accuracy"),
        "accuracy_per_round": [h["accuracy"] for h in history],
        "fl_accuracy_per_round": [h["fl_accuracy"] for h in history],
        "wall_per_round_s": [h["wall_s"] for h in history],
        # Bytes published by the run's nodes when each round closed, as the monitor saw them
        # in the nodes' latest metrics (a node's figure lags by at most one metrics message).
        "bytes_per_round": [monitor.bytes_at_round.get(int(h["round"])) for h in history],
        "bytes": sum(by_kind.values()),
        "bytes_by_kind": dict(sorted(by_kind.items())),
        "wall_s": round(wall, 3),
        "rounds": len(history),
        "target_accuracy": target,
        "wall_to_target_s": None if reached is None else reached["wall_s"],
        "nodes_reporting": len(monitor.final),
        "rejected": rejected,
        "fl_model_sha256": done["fl_model_sha256"],
        "controller_decisions": server.decisions if algorithm == "emo" else [],
    }


def comparisons(algorithms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline ratios between algorithms that ran."""
    out: dict[str, Any] = {}
    fl, sfl, emo, full = (algorithms.get(k) for k in ("fl", "sfl", "emo", "emo_all"))
    if fl and emo:
        out["emo_minus_fl_points"] = round(100 * (emo["accuracy"] - fl["accuracy"]), 2)
        out["fl_model_identical_with_overlays"] = fl["fl_model_sha256"] == emo["fl_model_sha256"]
    if sfl and emo:
        out["sfl_bytes_over_emo_bytes"] = round(sfl["bytes"] / emo["bytes"], 2)
        out["sfl_wall_over_emo_wall"] = round(sfl["wall_s"] / emo["wall_s"], 2)
    if emo and full:
        act = emo["bytes_by_kind"].get("activations", 0)
        act_full = full["bytes_by_kind"].get("activations", 0)
        saved = round(1 - act / act_full, 4) if act_full else None
        out["controller_activation_bytes_saved"] = saved
        out["controller_total_bytes_saved"] = round(1 - emo["bytes"] / full["bytes"], 4)
        out["controller_accuracy_cost_points"] = round(
            100 * (full["accuracy"] - emo["accuracy"]), 2)
    return out


def table(algorithms: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed at the end of ``emo run``."""
    lines = [f"{'algorithm':10} {'accuracy':>9} {'FL model':>9} {'MB sent':>9} "
             f"{'activ. MB':>10} {'wall s':>8} {'rounds':>7}"]
    for name, a in algorithms.items():
        lines.append(
            f"{name:10} {a['accuracy']:9.4f} {a['fl_accuracy']:9.4f} {a['bytes'] / 1e6:9.2f} "
            f"{a['bytes_by_kind'].get('activations', 0) / 1e6:10.2f} {a['wall_s']:8.1f} "
            f"{a['rounds']:7d}"
        )
    return "\n".join(lines)


async def run_scenario(
    broker: Any,
    config: RunConfig,
    out_dir: Path | None,
    say: Say = print,
    on_event: OnEvent | None = None,
) -> dict[str, Any]:
    """Run every algorithm of ``config`` on the same data split and seed; the summary.

    With ``out_dir``, writes summary.json there, and the plots and report.md beside it
    (:func:`emo_mqtt.report.write_report`). ``on_event`` receives a dict per round of each
    algorithm and a last one (``"event": "done"``) with the paths written.
    """
    compute.configure(config.fleet.parallel_training)
    plan = plan_data(config)
    say(f"data: {len(plan.devices)} devices x ~{len(next(iter(plan.devices.values())))} samples "
        f"({config.data.partition}, alpha={config.data.alpha}), "
        f"{len(plan.validation)} validation, {len(plan.test)} test")
    algorithms: dict[str, dict[str, Any]] = {}
    for algorithm in config.run.algorithms:
        say(f"== {algorithm}: {config.fleet.devices} devices"
            + (f", {config.fleet.overlays} overlays" if algorithm.startswith("emo") else ""))
        algorithms[algorithm] = await run_algorithm(
            broker, config, algorithm, plan, out_dir=out_dir, say=say, on_event=on_event)
    summary = {
        "scenario": config.source,
        "config": config.to_dict(),
        "algorithms": algorithms,
        "comparisons": comparisons(algorithms),
    }
    written: list[Path] = []
    if out_dir is not None:
        from emo_mqtt.report import write_report

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            written = write_report(summary, out_dir)
        except ImportError as exc:  # matplotlib is a dependency; a broken install loses plots
            log.warning("no plots or report.md: %s (pip install matplotlib)", exc)
        else:
            say(f"report: {out_dir / 'report.md'} and {len(written) - 1} plots")
    if on_event is not None:
        on_event({
            "event": "done",
            "summary": None if out_dir is None else str(out_dir / "summary.json"),
            "report": [str(p) for p in written],
            "algorithms": {name: {"accuracy": a["accuracy"], "fl_accuracy": a["fl_accuracy"],
                                  "bytes": a["bytes"], "wall_s": a["wall_s"]}
                           for name, a in algorithms.items()},
            "comparisons": summary["comparisons"],
        })
    return summary
