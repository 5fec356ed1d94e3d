"""What the dashboard knows about the fleet, built from the telemetry branch's messages.

This module is pure: no asyncio, no MQTT, no I/O. :class:`FleetState` ingests
``(topic, payload)`` pairs as they come off the bus (statuses, metrics and the server's
retained run state) and produces a JSON-able snapshot (:meth:`FleetState.snapshot`) for
the web page, and :func:`prometheus_text` turns a snapshot into Prometheus exposition
text. Nothing malformed raises: it is counted. The run-level views (lifecycle, alerts,
counts by state and site, stragglers, search) are :mod:`emo_mqtt.dashboard.fleetview`'s.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emo_mqtt.dashboard import fleetview
from emo_mqtt.errors import TelemetryError, TopicError
from emo_mqtt.telemetry import parse_metrics, parse_run_state, parse_status
from emo_mqtt.topics import Kind, parse

#: Bytes samples kept per run (older ones are dropped).
MAX_BYTES_SAMPLES = 600
#: Samples closer than this (seconds) to the previous one replace it instead of adding one.
SAMPLE_MIN_GAP_S = 0.25
#: Runs kept (the least recently active ones are forgotten beyond this).
MAX_RUNS = 50
#: Above this many nodes a run is a big fleet: the snapshot carries counts, stragglers and
#: a search instead of one entry per node (the page stays small and fast).
BIG_FLEET = 64
#: Controller rows a snapshot carries at most (the rest are counted).
MAX_DECISION_ROWS = 64
_PARSERS = {Kind.STATUS: parse_status, Kind.METRICS: parse_metrics, Kind.RUN_STATE: parse_run_state}


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
    #: The server's retained run state (``telemetry/run``), cleaned; None before any.
    lifecycle: dict[str, Any] | None = None
    #: The algorithm, from the run state or the nodes' metrics.
    algorithm: str | None = None
    #: device id -> last round it reported having trained (its metrics after an update).
    trained: dict[str, int] = field(default_factory=dict)
    #: "role/id" -> latest bytes_out_by_kind.
    node_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Sum of ``node_bytes`` by kind, kept up to date message by message (not re-summed:
    #: with 1,000 nodes that would be 1,000 dicts per message).
    bytes_totals: dict[str, int] = field(default_factory=dict)
    #: "role/id" -> latest rejected-by-reason counts.
    node_rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_samples: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=MAX_BYTES_SAMPLES)
    )
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    round: int = 0
    last_seen: float = 0.0

    def set_bytes(self, key: str, kinds: dict[str, int]) -> None:
        """Replace node ``key``'s bytes by kind, keeping :attr:`bytes_totals` in step."""
        for kind, count in self.node_bytes.get(key, {}).items():
            self.bytes_totals[kind] -= count
        for kind, count in kinds.items():
            self.bytes_totals[kind] = self.bytes_totals.get(kind, 0) + count
        self.node_bytes[key] = kinds

    def bytes_by_kind(self) -> dict[str, int]:
        """Sum over the run's nodes of their latest bytes by kind."""
        return dict(sorted(self.bytes_totals.items()))

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

    def node_count(self) -> int:
        return sum(len(nodes) for nodes in self.nodes.values())


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
        parser = _PARSERS.get(where.kind)
        if parser is None or (where.kind is not Kind.RUN_STATE and where.node is None):
            self.ignored += 1
            return False
        try:
            # Untrusted, possibly retained (a device may write its own status and metrics):
            # bounded depth and size, known fields type-checked, or skipped and counted.
            body = parser(payload)
        except TelemetryError as exc:
            self.malformed += 1
            self.malformed_by_reason[exc.reason] = self.malformed_by_reason.get(exc.reason, 0) + 1
            return False
        self.messages += 1
        run = self._run(where.run)
        if self._restarted(run, where.kind, where.role, body):
            # A new run under an ended run's id (emo run clears and restarts it): history
            # starts over; the nodes' retained statuses stay (they are still true).
            run = self.runs[where.run] = RunState(where.run, nodes=run.nodes)
        run.last_seen = self.clock()
        if where.kind is Kind.RUN_STATE:
            self._run_state(run, body)
        elif where.kind is Kind.STATUS:
            assert where.node is not None
            self._status(run, where.role or "node", where.node, body)
        else:
            assert where.node is not None
            self._metrics(run, where.role or "node", where.node, body)
        self.version += 1
        return True

    @staticmethod
    def _restarted(run: RunState, kind: Kind, role: str | None, body: dict[str, Any]) -> bool:
        """Whether ``body`` starts a new run under ``run``'s (ended) id."""
        ended = run.final is not None or (
            run.lifecycle is not None and run.lifecycle["state"] in ("finished", "interrupted")
        )
        if not ended:
            return False  # a server resumed from its checkpoint continues its run
        if kind is Kind.RUN_STATE:
            return body.get("state") in ("starting", "live")
        return kind is Kind.STATUS and role == "server" and body.get("state") == "online"

    def _run_state(self, run: RunState, body: dict[str, Any]) -> None:
        layout = body.get("layout") or {}
        run.lifecycle = {
            "state": body.get("state", "live"),
            "incarnation": body.get("incarnation"),
            "round": int(body.get("round", 0)),
            "closed": int(body.get("closed", 0)),
            "rounds": int(body.get("rounds", 0)),
            "controller": body.get("controller"),
            "sampled": list(body.get("sampled", [])),
            "layout": {str(o): list(ids) for o, ids in layout.items()},
            "overlay_of": {d: str(o) for o, ids in layout.items() for d in ids},
        }
        if isinstance(body.get("algorithm"), str):
            run.algorithm = body["algorithm"]
        run.round = max(run.round, run.lifecycle["round"])
        for record in body.get("history", []):
            number = _number(record.get("round"))
            if number is None:
                continue
            run.rounds[int(number)] = {
                "round": int(number),
                "accuracy": _number(record.get("accuracy")),
                "fl_accuracy": _number(record.get("fl_accuracy")),
                "wall_s": _number(record.get("wall_s")),
                "updates": _number(record.get("updates")),
                "missing": [str(m) for m in record.get("missing") or [] if isinstance(m, str)],
            }
        final = body.get("final")
        if body.get("state") == "finished" and isinstance(final, dict) and run.final is None:
            run.final = self._final(final)

    @staticmethod
    def _final(body: dict[str, Any]) -> dict[str, Any]:
        return {
            "accuracy": _number(body.get("accuracy")),
            "fl_accuracy": _number(body.get("fl_accuracy")),
            "rounds": _number(body.get("rounds")),
            "train_wall_s": _number(body.get("train_wall_s")),
        }

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
        if isinstance(body.get("algorithm"), str) and run.algorithm is None:
            run.algorithm = body["algorithm"]
        node_round = _number(body.get("round"))
        if node_round is not None:
            run.round = max(run.round, int(node_round))
            if role == "device" and body.get("final") is False:
                # A device publishes its (non-final) metrics right after sending an update.
                run.trained[node] = max(run.trained.get(node, 0), int(node_round))
        if "bytes_out_by_kind" in body:
            run.set_bytes(key, _counts(body["bytes_out_by_kind"]))
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
                "missing": [str(m) for m in body.get("missing") or [] if isinstance(m, str)],
            }
        elif event == "done":
            run.final = self._final(body)
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
        lc = fleetview.lifecycle(run)
        counts = fleetview.state_counts(run)
        online = {role: c["online"] for role, c in counts.items()}
        total = {role: sum(c.values()) for role, c in counts.items()}
        node_count = sum(total.values())
        big = node_count > BIG_FLEET
        decisions = dict(sorted(run.decisions.items()))
        return {
            "name": run.name,
            "algorithm": run.algorithm,
            "done": lc["state"] == "finished",
            "lifecycle": lc,
            "round": run.round,
            "last_seen": run.last_seen,
            # A big fleet's page shows counts and a search, not one entry per node.
            "big": big,
            "nodes": {}
            if big
            else {role: dict(sorted(n.items())) for role, n in sorted(run.nodes.items())},
            "states": counts,
            "online": online,
            "total": total,
            "online_count": sum(online.values()),
            "node_count": node_count,
            "sites": fleetview.sites(run, lc),
            "stragglers": fleetview.stragglers(run, lc),
            "accuracy": [run.rounds[r] for r in sorted(run.rounds)],
            "final": run.final,
            "latest_accuracy": run.latest_accuracy(),
            "bytes": list(run.bytes_samples),
            "bytes_by_kind": run.bytes_by_kind(),
            "cache": dict(sorted(run.cache.items())),
            "has_controller": fleetview.has_controller(run),
            "decisions": dict(list(decisions.items())[:MAX_DECISION_ROWS]),
            "decision_count": len(decisions),
            "rejected": run.rejected(),
        }

    def _alerts(self, run: RunState) -> list[dict[str, Any]]:
        return fleetview.alerts(run, fleetview.lifecycle(run))

    def search(self, run: str, query: str) -> dict[str, Any]:
        """Nodes of ``run`` matching ``query`` (the page's search box); JSON-able."""
        found = self.runs.get(run)
        if found is None:
            return {"run": run, "query": query, "count": 0, "results": []}
        out: dict[str, Any] = _clean(fleetview.search(found, query))
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
