"""What the dashboard knows about the fleet, built from status and metrics messages.

This module is pure: no asyncio, no MQTT, no I/O. :class:`FleetState` ingests
``(topic, payload)`` pairs as they come off the bus and produces a JSON-able snapshot
(:meth:`FleetState.snapshot`) for the web page, and :func:`prometheus_text` turns a
snapshot into Prometheus exposition text. Nothing malformed raises: it is counted.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emo_mqtt.errors import TelemetryError, TopicError
from emo_mqtt.telemetry import parse_metrics, parse_status
from emo_mqtt.topics import Kind, parse

#: Bytes samples kept per run (older ones are dropped).
MAX_BYTES_SAMPLES = 600
#: Samples closer than this (seconds) to the previous one replace it instead of adding one.
SAMPLE_MIN_GAP_S = 0.25
#: Runs kept (the least recently active ones are forgotten beyond this).
MAX_RUNS = 50


def _clean(value: Any) -> Any:
    """``value`` with non-finite floats turned into ``None`` (browsers' JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    """A finite float from ``value``, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _counts(value: Any) -> dict[str, int]:
    """A ``{name: non-negative int}`` map from a JSON object; anything else is dropped."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, int] = {}
    for key, count in value.items():
        number = _number(count)
        if number is not None and number >= 0:
            out[str(key)] = int(number)
    return out


@dataclass
class RunState:
    """Everything known about one run."""

    name: str
    #: role -> node id -> last status (state, round, version, time).
    nodes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: round -> {round, accuracy, fl_accuracy, wall_s, updates}.
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    final: dict[str, Any] | None = None
    #: "role/id" -> latest bytes_out_by_kind.
    node_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: "role/id" -> latest rejected-by-reason counts.
    node_rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_samples: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=MAX_BYTES_SAMPLES)
    )
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    round: int = 0
    last_seen: float = 0.0

    def bytes_by_kind(self) -> dict[str, int]:
        """Sum over the run's nodes of their latest bytes by kind."""
        total: dict[str, int] = {}
        for kinds in self.node_bytes.values():
            for kind, count in kinds.items():
                total[kind] = total.get(kind, 0) + count
        return dict(sorted(total.items()))

    def rejected(self) -> dict[str, int]:
        """Sum over the run's nodes of their latest rejected counts, by reason."""
        total: dict[str, int] = {}
        for reasons in self.node_rejected.values():
            for reason, count in reasons.items():
                total[reason] = total.get(reason, 0) + count
        return {k: v for k, v in sorted(total.items()) if v > 0}

    def latest_accuracy(self) -> float | None:
        """The final accuracy when the run is done, else the last round's."""
        if self.final is not None and _number(self.final.get("accuracy")) is not None:
            return float(self.final["accuracy"])
        if self.rounds:
            value = self.rounds[max(self.rounds)].get("accuracy")
            return value if isinstance(value, float) else None
        return None


class FleetState:
    """The fleet as the dashboard sees it: ingest messages, take snapshots."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.runs: dict[str, RunState] = {}
        self.malformed = 0
        #: ``malformed`` by reason (see :data:`emo_mqtt.telemetry.REASONS`).
        self.malformed_by_reason: dict[str, int] = {}
        self.ignored = 0
        self.messages = 0
        #: Bumped on every change; lets servers push snapshots only when something changed.
        self.version = 0

    # -- ingest -----------------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes | bytearray) -> bool:
        """Take one message into account; whether the state changed. Never raises."""
        if not payload:
            return False  # an empty retained payload: a cleared topic
        try:
            where = parse(topic)
        except TopicError:
            self.ignored += 1
            return False
        if where.kind not in (Kind.STATUS, Kind.METRICS) or where.node is None:
            self.ignored += 1
            return False
        try:
            # Untrusted, possibly retained (a device may write its own status and metrics):
            # bounded depth and size, known fields type-checked, or skipped and counted.
            body = (parse_status if where.kind is Kind.STATUS else parse_metrics)(payload)
        except TelemetryError as exc:
            self.malformed += 1
            self.malformed_by_reason[exc.reason] = self.malformed_by_reason.get(exc.reason, 0) + 1
            return False
        self.messages += 1
        run = self._run(where.run)
        if (
            where.kind is Kind.STATUS
            and where.role == "server"
            and run.final is not None
            and body.get("state") == "online"
        ):
            # A new run under a finished run's id (emo run clears and restarts it).
            run = self.runs[where.run] = RunState(where.run, nodes=run.nodes)
        run.last_seen = self.clock()
        role = where.role or "node"
        if where.kind is Kind.STATUS:
            self._status(run, role, where.node, body)
        else:
            self._metrics(run, role, where.node, body)
        self.version += 1
        return True

    def _run(self, name: str) -> RunState:
        run = self.runs.get(name)
        if run is None:
            if len(self.runs) >= MAX_RUNS:
                oldest = min(self.runs.values(), key=lambda r: r.last_seen)
                del self.runs[oldest.name]
            run = self.runs[name] = RunState(name)
        return run

    def _status(self, run: RunState, role: str, node: str, body: dict[str, Any]) -> None:
        state = body.get("state")
        node_round = _number(body.get("round"))
        run.nodes.setdefault(role, {})[node] = {
            "state": state if state in ("online", "offline") else "unknown",
            "round": int(node_round) if node_round is not None else None,
            "version": str(body.get("version", "")),
            "time": _number(body.get("time")) or self.clock(),
        }

    def _metrics(self, run: RunState, role: str, node: str, body: dict[str, Any]) -> None:
        key = f"{role}/{node}"
        now = self.clock()
        run.nodes.setdefault(role, {}).setdefault(
            node, {"state": "unknown", "round": None, "version": "", "time": now}
        )
        node_round = _number(body.get("round"))
        if node_round is not None:
            run.round = max(run.round, int(node_round))
        if "bytes_out_by_kind" in body:
            run.node_bytes[key] = _counts(body["bytes_out_by_kind"])
            self._sample_bytes(run, now)
        if "rejected" in body:
            run.node_rejected[key] = _counts(body["rejected"])
        event = body.get("event")
        if event == "round" and node_round is not None:
            run.rounds[int(node_round)] = {
                "round": int(node_round),
                "accuracy": _number(body.get("accuracy")),
                "fl_accuracy": _number(body.get("fl_accuracy")),
                "wall_s": _number(body.get("wall_s")),
                "updates": _number(body.get("updates")),
            }
        elif event == "done":
            run.final = {
                "accuracy": _number(body.get("accuracy")),
                "fl_accuracy": _number(body.get("fl_accuracy")),
                "rounds": _number(body.get("rounds")),
                "train_wall_s": _number(body.get("train_wall_s")),
            }
        if isinstance(body.get("cache"), dict):
            cache = body["cache"]
            run.cache[node] = {
                k: _number(cache.get(k))
                for k in ("entries", "capacity", "bytes", "capacity_bytes", "mean_staleness")
            } | {"loss": _number(body.get("loss"))}
        if isinstance(body.get("decision"), dict):
            d = body["decision"]
            run.decisions[node] = {
                "fraction": _number(d.get("fraction")),
                "precision": str(d.get("precision", "")),
                "interval": _number(d.get("interval")),
                "round": int(node_round) if node_round is not None else None,
                "activation_bytes": _number(body.get("activation_bytes")),
            }

    def _sample_bytes(self, run: RunState, now: float) -> None:
        sample = {"t": now, "by_kind": run.bytes_by_kind()}
        samples = run.bytes_samples
        if samples and now - samples[-1]["t"] < SAMPLE_MIN_GAP_S and len(samples) > 1:
            samples[-1] = sample
        else:
            samples.append(sample)

    # -- snapshot ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The whole state as a JSON-able dict (strict JSON: no NaN)."""
        runs = {}
        alerts: list[dict[str, Any]] = []
        for name in sorted(self.runs, key=lambda n: self.runs[n].last_seen, reverse=True):
            run = self.runs[name]
            runs[name] = self._run_snapshot(run)
            alerts.extend(self._alerts(run))
        out: dict[str, Any] = _clean(
            {
                "time": self.clock(),
                "version": self.version,
                "messages": self.messages,
                "malformed": self.malformed,
                "malformed_by_reason": dict(sorted(self.malformed_by_reason.items())),
                "ignored": self.ignored,
                "runs": runs,
                "alerts": alerts,
            }
        )
        return out

    def _run_snapshot(self, run: RunState) -> dict[str, Any]:
        online = {
            role: sum(1 for n in nodes.values() if n["state"] == "online")
            for role, nodes in sorted(run.nodes.items())
        }
        total = {role: len(nodes) for role, nodes in sorted(run.nodes.items())}
        return {
            "name": run.name,
            "done": run.final is not None,
            "round": run.round,
            "last_seen": run.last_seen,
            "nodes": {role: dict(sorted(n.items())) for role, n in sorted(run.nodes.items())},
            "online": online,
            "total": total,
            "online_count": sum(online.values()),
            "node_count": sum(total.values()),
            "accuracy": [run.rounds[r] for r in sorted(run.rounds)],
            "final": run.final,
            "latest_accuracy": run.latest_accuracy(),
            "bytes": list(run.bytes_samples),
            "bytes_by_kind": run.bytes_by_kind(),
            "cache": dict(sorted(run.cache.items())),
            "decisions": dict(sorted(run.decisions.items())),
            "rejected": run.rejected(),
        }

    def _alerts(self, run: RunState) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if run.final is None:  # after the end of a run, nodes going offline is expected
            for role, nodes in sorted(run.nodes.items()):
                for node, status in sorted(nodes.items()):
                    if status["state"] == "offline":
                        out.append(
                            {
                                "run": run.name,
                                "level": "warning",
                                "kind": "offline",
                                "node": f"{role}/{node}",
                                "time": status["time"],
                                "message": f"{role} {node} is offline",
                            }
                        )
        for reason, count in run.rejected().items():
            out.append(
                {
                    "run": run.name,
                    "level": "warning",
                    "kind": "rejected",
                    "node": None,
                    "time": run.last_seen,
                    "message": f"{count} input(s) rejected: {reason}",
                }
            )
        return out


# -- Prometheus -------------------------------------------------------------------------------
def _label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(snapshot: dict[str, Any]) -> str:
    """Prometheus exposition text (format 0.0.4) for a :meth:`FleetState.snapshot`."""
    families: list[tuple[str, str, str, list[str]]] = [
        ("emo_nodes_online", "gauge", "Nodes whose retained status is online.", []),
        ("emo_nodes_known", "gauge", "Nodes that announced themselves.", []),
        ("emo_accuracy", "gauge", "Latest test accuracy of the run's deployed model.", []),
        ("emo_round", "gauge", "Latest round reported by the run's nodes.", []),
        ("emo_bytes_total", "counter", "MQTT payload bytes published, by kind.", []),
        ("emo_rejected_total", "counter", "Inputs rejected by the run's nodes, by reason.", []),
    ]
    rows = {name: lines for name, _, _, lines in families}
    for name, run in snapshot.get("runs", {}).items():
        r = _label(str(name))
        for role, count in run.get("online", {}).items():
            rows["emo_nodes_online"].append(f'{{run="{r}",role="{_label(role)}"}} {count}')
        for role, count in run.get("total", {}).items():
            rows["emo_nodes_known"].append(f'{{run="{r}",role="{_label(role)}"}} {count}')
        accuracy = run.get("latest_accuracy")
        if isinstance(accuracy, int | float):
            rows["emo_accuracy"].append(f'{{run="{r}"}} {float(accuracy)!r}')
        rows["emo_round"].append(f'{{run="{r}"}} {int(run.get("round", 0))}')
        for kind, count in run.get("bytes_by_kind", {}).items():
            rows["emo_bytes_total"].append(f'{{run="{r}",kind="{_label(kind)}"}} {count}')
        for reason, count in run.get("rejected", {}).items():
            rows["emo_rejected_total"].append(f'{{run="{r}",reason="{_label(reason)}"}} {count}')
    out: list[str] = []
    for name, kind, help_text, lines in families:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{line}" for line in lines)
    out.append(
        f"# HELP emo_dashboard_malformed_total Malformed messages seen.\n"
        f"# TYPE emo_dashboard_malformed_total counter\n"
        f"emo_dashboard_malformed_total {int(snapshot.get('malformed', 0))}"
    )
    return "\n".join(out) + "\n"
