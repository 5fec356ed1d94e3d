"""The ``[network]`` section of a scenario: link conditions per class and node, and a timeline.

Pure: it reads the TOML table (and the trace files it names), validates everything before a
run starts, and turns it into a plan that :mod:`emo_mqtt.netreplay` carries out against the
real broker. Every error is a :class:`~emo_mqtt.errors.ConfigError` naming the key (or the
file and line) and the problem.

The model: the broker is the hub, and each node has one link to it. A link has an uplink
(node -> broker) and a downlink (broker -> node), each with a bandwidth, and both directions
share the one-way latency, jitter and loss. A node's conditions are its class's table
(``[network.device]``, ``[network.overlay]``, ``[network.server]``) with its own table
(``[network.nodes.<id>]``) on top. The timeline changes them as the run goes: events from
``[[network.events]]``, from a CSV trace, from duty cycles, and from FedScale availability
traces. ``scenarios/README.md`` documents every key, with its unit and default.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from emo_mqtt.errors import ConfigError
from emo_mqtt.linkmodel import LinkSpec

LINK_CLASSES = ("device", "overlay", "server")
ACTIONS = ("down", "up", "link", "crash", "restart")
Action = Literal["down", "up", "link", "crash", "restart"]
#: What ``for_s`` does when it runs out: the opposite action.
_UNDO: dict[str, Action] = {
    "down": "up",
    "up": "down",
    "crash": "restart",
    "restart": "crash",
    "link": "link",
}
#: Keys of a link table, with their unit (documented in scenarios/README.md).
LINK_KEYS = ("up_mbps", "down_mbps", "latency_ms", "jitter_ms", "loss")
#: One megabit per second in bytes per second.
MBPS = 125_000.0
#: Columns of a CSV trace (``network.trace``); a header row names them, in any order.
TRACE_COLUMNS = ("time_s", "target", "action", "for_s", *LINK_KEYS)


@dataclass(frozen=True)
class LinkConditions:
    """One node's link to the broker, in field units.

    ``up_mbps``/``down_mbps``: megabits per second (``None``: not limited); ``latency_ms``:
    one-way delay, each direction; ``jitter_ms``: uniform spread around it; ``loss``: the
    probability that a segment is lost and retransmitted (a delay of one RTO, see
    :mod:`emo_mqtt.shaping`).
    """

    up_mbps: float | None = None
    down_mbps: float | None = None
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0

    def updated(self, values: dict[str, float]) -> LinkConditions:
        return replace(self, **values)

    def uplink(self, rto_s: float) -> LinkSpec:
        return self._spec(self.up_mbps, rto_s)

    def downlink(self, rto_s: float) -> LinkSpec:
        return self._spec(self.down_mbps, rto_s)

    def _spec(self, mbps: float | None, rto_s: float) -> LinkSpec:
        return LinkSpec(
            bandwidth_bps=None if mbps is None else mbps * MBPS,
            latency_s=self.latency_ms / 1000,
            jitter_s=self.jitter_ms / 1000,
            loss=self.loss,
            rto_s=rto_s,
        )

    @property
    def shaped(self) -> bool:
        return self != LinkConditions()


@dataclass(frozen=True)
class NetEvent:
    """One change on the timeline, as written (its target not yet resolved to nodes).

    ``target``: a node id, a link class (every node of it), ``"all"``, or ``"broker"`` (every
    link at once: the broker unreachable). ``link``: for ``action = "link"``, the keys that
    change. ``for_s``: undo after this long (``down`` -> ``up``, ``crash`` -> ``restart``,
    ``link`` -> the node's base conditions). ``source``: where it was written, for messages.
    """

    at_s: float
    target: str
    action: Action
    for_s: float | None = None
    link: tuple[tuple[str, float], ...] = ()
    source: str = ""


@dataclass(frozen=True)
class NodeEvent:
    """One change for one node at one time: what the replay applies."""

    at_s: float
    node: str
    action: Action
    #: For ``link`` (and an undone ``link``): the node's conditions from then on.
    conditions: LinkConditions | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "at_s": round(self.at_s, 6),
            "node": self.node,
            "action": self.action,
            "source": self.source,
        }
        if self.conditions is not None:
            out["conditions"] = {k: getattr(self.conditions, k) for k in LINK_KEYS}
        return out


@dataclass(frozen=True)
class DutyCycle:
    """Nodes reachable ``on_s`` seconds of every ``period_s`` (``[[network.duty_cycle]]``)."""

    target: str
    period_s: float
    on_s: float
    phase: Literal["random", "aligned"] = "random"
    source: str = ""


@dataclass(frozen=True)
class Availability:
    """A FedScale client availability trace mapped onto devices (``[network.availability]``)."""

    clients: tuple[tuple[str, tuple[tuple[float, float], ...], float], ...]
    time_scale: float
    offset_s: float
    source: str = ""


@dataclass(frozen=True)
class NetworkConfig:
    """The validated ``[network]`` section; ``raw`` is the table as written (round-trips)."""

    raw: dict[str, Any] = field(default_factory=dict)
    classes: tuple[tuple[str, LinkConditions], ...] = ()
    #: Per node, the link keys its own table gives (they override its class's, key by key).
    nodes: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    compute_speed: tuple[tuple[str, float], ...] = ()
    events: tuple[NetEvent, ...] = ()
    duty_cycles: tuple[DutyCycle, ...] = ()
    availability: Availability | None = None
    seed: int | None = None
    rto_s: float = 0.2
    #: Every node id of the scenario: a target naming one that an algorithm's fleet lacks
    #: (an overlay under FL) has no events there, rather than being an error.
    scenario_nodes: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        """Whether a run must put a shaping proxy between its nodes and the broker."""
        return bool(self.raw)

    def base_conditions(self, node: str, link_class: str) -> LinkConditions:
        """The node's conditions before any event: its class's, then its own table's."""
        base = dict(self.classes).get(link_class, LinkConditions())
        return base.updated(dict(dict(self.nodes).get(node, ())))

    def device_compute_speed(self, device: str, default: float) -> float:
        return dict(self.compute_speed).get(device, default)

    def timeline(
        self, nodes_by_class: dict[str, list[str]], *, seed: int, horizon_s: float
    ) -> list[NodeEvent]:
        """Every event for every node up to ``horizon_s``, in time order (stable, seeded).

        The same scenario and seed give the same list: duty-cycle phases and the clients
        picked from an availability trace come from ``random.Random`` seeded by ``seed``.
        """
        link_class = {n: c for c, ids in nodes_by_class.items() for n in ids}
        rng = random.Random(f"network:{seed}")
        out: list[NodeEvent] = []

        def resolve(target: str, where: str) -> list[str]:
            if target in ("all", "broker"):
                return [n for c in LINK_CLASSES for n in nodes_by_class.get(c, [])]
            if target in LINK_CLASSES:
                return list(nodes_by_class.get(target, []))
            if target in link_class:
                return [target]
            if target in self.scenario_nodes:
                return []  # a node of the scenario that this algorithm does not run
            raise ConfigError(
                f"{where}: target {target!r} is not a node of this fleet, a "
                f"link class {LINK_CLASSES}, 'all' or 'broker'"
            )

        for ev in self.events:
            for node in resolve(ev.target, ev.source):
                if ev.action in ("crash", "restart") and link_class[node] == "server":
                    raise ConfigError(
                        f"{ev.source}: the server cannot crash in a scenario "
                        "(tests/test_faults.py covers a server restart)"
                    )
                base = self.base_conditions(node, link_class[node])
                cond = base.updated(dict(ev.link)) if ev.action == "link" else None
                out.append(NodeEvent(ev.at_s, node, ev.action, cond, ev.source))
                if ev.for_s is not None:
                    undo = _UNDO[ev.action]
                    out.append(
                        NodeEvent(
                            ev.at_s + ev.for_s,
                            node,
                            undo,
                            base if undo == "link" else None,
                            f"{ev.source} (after for_s)",
                        )
                    )
        for cycle in self.duty_cycles:
            for node in resolve(cycle.target, cycle.source):
                offset = rng.uniform(0, cycle.period_s) if cycle.phase == "random" else 0.0
                out.extend(_duty_events(node, cycle, offset, horizon_s))
        if self.availability is not None:
            devices = nodes_by_class.get("device", [])
            clients = list(self.availability.clients)
            if len(clients) < len(devices):
                raise ConfigError(
                    f"{self.availability.source}: {len(clients)} clients in the "
                    f"trace for {len(devices)} devices"
                )
            picked = rng.sample(clients, len(devices))
            for device, client in zip(devices, picked, strict=True):
                out.extend(_availability_events(device, client, self.availability, horizon_s))
        out = [e for e in out if e.at_s <= horizon_s]
        out.sort(key=lambda e: e.at_s)  # stable: same-time events keep their written order
        return out


def _duty_events(node: str, cycle: DutyCycle, offset: float, horizon_s: float) -> list[NodeEvent]:
    """Reachable during ``[offset + kP, offset + kP + on)`` for every integer k; down otherwise."""
    period, on = cycle.period_s, cycle.on_s
    out: list[NodeEvent] = []
    k = -1
    while offset + k * period <= horizon_s:
        start = offset + k * period
        off_at, back_at = max(start + on, 0.0), start + period
        if back_at > off_at:
            out.append(NodeEvent(off_at, node, "down", None, cycle.source))
            out.append(NodeEvent(back_at, node, "up", None, cycle.source))
        k += 1
    return out


def _availability_events(
    device: str,
    client: tuple[str, tuple[tuple[float, float], ...], float],
    trace: Availability,
    horizon_s: float,
) -> list[NodeEvent]:
    """A client's active intervals on the run's clock (FedScale traces wrap around).

    Run time ``t`` is trace time ``offset_s + t / time_scale``, modulo the trace's
    ``finish_time``. The device is down at ``t = 0`` unless an active interval covers it.
    """
    name, intervals, finish = client
    where = f"{trace.source} client {name}"
    scale = trace.time_scale
    on: list[tuple[float, float]] = []
    lap = -(trace.offset_s % finish) * scale
    while lap <= horizon_s:
        for begin, end in intervals:
            a, b = lap + begin * scale, lap + end * scale
            if b > 0 and a <= horizon_s:
                on.append((max(a, 0.0), b))
        lap += finish * scale
    merged: list[tuple[float, float]] = []
    for a, b in sorted(on):  # intervals that touch (across a wrap too) are one: no blip
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    on = merged
    out: list[NodeEvent] = []
    if not on or on[0][0] > 0:
        out.append(NodeEvent(0.0, device, "down", None, where))
    for a, b in on:
        if a > 0:
            out.append(NodeEvent(a, device, "up", None, where))
        out.append(NodeEvent(b, device, "down", None, where))
    return out


# -- parsing ---------------------------------------------------------------------------------
def _number(
    where: str,
    value: Any,
    *,
    minimum: float = 0.0,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < minimum or (positive and value <= 0) or (maximum is not None and value > maximum):
        bound = (
            f"in [{minimum}, {maximum}]"
            if maximum is not None
            else (f"> {minimum}" if positive else f">= {minimum}")
        )
        raise ConfigError(f"{where}: {value!r} must be {bound}")
    return float(value)


def _link_values(
    where: str, table: dict[str, Any], extra: tuple[str, ...] = ()
) -> dict[str, float]:
    unknown = sorted(set(table) - set(LINK_KEYS) - set(extra))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(LINK_KEYS + extra)}")
    out: dict[str, float] = {}
    for key in LINK_KEYS:
        if key not in table:
            continue
        if key.endswith("_mbps"):
            out[key] = _number(f"{where}.{key}", table[key], positive=True)
        elif key == "loss":
            out[key] = _number(f"{where}.{key}", table[key], maximum=1.0)
        else:
            out[key] = _number(f"{where}.{key}", table[key])
    return out


def _event(where: str, entry: dict[str, Any]) -> NetEvent:
    known = ("at_s", "target", "action", "for_s", *LINK_KEYS)
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("at_s", "target", "action"):
        if key not in entry:
            raise ConfigError(f"{where}: missing key {key!r}")
    at = _number(f"{where}.at_s", entry["at_s"])
    target = entry["target"]
    if not isinstance(target, str) or not target:
        raise ConfigError(
            f"{where}.target: expected a node id, a link class, 'all' or 'broker', got {target!r}"
        )
    action = entry["action"]
    if action not in ACTIONS:
        raise ConfigError(f"{where}.action: {action!r} is not one of {ACTIONS}")
    link = _link_values(where, {k: v for k, v in entry.items() if k in LINK_KEYS})
    if action == "link" and not link:
        raise ConfigError(f"{where}: action 'link' needs at least one of {LINK_KEYS}")
    if action != "link" and link:
        raise ConfigError(f"{where}: link keys {sorted(link)} only go with action 'link'")
    if target == "broker" and action not in ("down", "up"):
        raise ConfigError(f"{where}: the broker target takes only 'down' or 'up'")
    for_s = None
    if "for_s" in entry:
        for_s = _number(f"{where}.for_s", entry["for_s"], positive=True)
    return NetEvent(at, target, action, for_s, tuple(sorted(link.items())), where)


def _read_trace_csv(where: str, path: Path) -> list[NetEvent]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read trace {path}: {exc}") from exc
    # (line number, fields): blank and comment lines are skipped but still counted, so that
    # messages name the line an editor shows.
    rows = [
        (number, next(csv.reader([line])))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not rows:
        raise ConfigError(f"{path}: empty trace (a header row is needed: {TRACE_COLUMNS})")
    header = [h.strip() for h in rows[0][1]]
    unknown = sorted(set(header) - set(TRACE_COLUMNS))
    if unknown:
        raise ConfigError(f"{path}: unknown column(s) {unknown}; known: {list(TRACE_COLUMNS)}")
    if len(set(header)) != len(header):
        raise ConfigError(f"{path}: duplicate columns in the header")
    events = []
    for number, row in rows[1:]:
        line = f"{path.name}:{number}"
        if len(row) != len(header):
            raise ConfigError(f"{line}: {len(row)} fields, the header has {len(header)}")
        entry: dict[str, Any] = {}
        for name, cell in zip(header, row, strict=True):
            cell = cell.strip()
            if not cell:
                continue
            if name in ("target", "action"):
                entry[name] = cell
            else:
                try:
                    entry[name] = float(cell)
                except ValueError:
                    raise ConfigError(f"{line}: {name} {cell!r} is not a number") from None
        if "time_s" in entry:
            entry["at_s"] = entry.pop("time_s")
        events.append(_event(line, entry))
    return events


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain containers, numbers and strings only: any class is refused.

    FedScale ships its traces as pickles; a pickle can run code when it names a class, so
    this loader names none (a trace of dicts, lists, ints, floats and strings needs none).
    """

    def find_class(self, module: str, name: str) -> Any:
        raise ConfigError(
            f"refusing to load {module}.{name} from a trace pickle: only plain "
            "dicts, lists, numbers and strings are accepted"
        )


def _load_trace_file(where: str, path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc}") from exc
    if path.suffix == ".json":
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    try:
        import io

        return _PlainUnpickler(io.BytesIO(data)).load()
    except ConfigError:
        raise
    except Exception as exc:  # any malformed pickle: the loader raises many types
        raise ConfigError(f"{path}: not a FedScale trace (JSON or plain pickle): {exc}") from exc


def _availability(where: str, table: dict[str, Any], base_dir: Path) -> Availability:
    known = ("file", "format", "time_scale", "offset_s")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {list(known)}")
    if table.get("format", "fedscale") != "fedscale":
        raise ConfigError(f"{where}.format: only 'fedscale' is supported, got {table['format']!r}")
    if not isinstance(table.get("file"), str):
        raise ConfigError(f"{where}.file: the trace file's path is required")
    path = (base_dir / table["file"]).resolve()
    scale = _number(f"{where}.time_scale", table.get("time_scale", 1.0), positive=True)
    offset = _number(f"{where}.offset_s", table.get("offset_s", 0.0))
    trace = _load_trace_file(where, path)
    if not isinstance(trace, dict) or not trace:
        raise ConfigError(f"{path}: expected a non-empty map of client id -> trace")
    clients = []
    for client, entry in sorted(trace.items(), key=lambda kv: str(kv[0])):
        cw = f"{path.name} client {client}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{cw}: expected a map with 'active', 'inactive', 'finish_time'")
        try:
            active = [_number(f"{cw}.active", t) for t in entry["active"]]
            inactive = [_number(f"{cw}.inactive", t) for t in entry["inactive"]]
            finish = _number(f"{cw}.finish_time", entry["finish_time"], positive=True)
        except KeyError as exc:
            raise ConfigError(f"{cw}: missing {exc.args[0]!r}") from None
        except TypeError as exc:  # 'active' or 'inactive' not a list
            raise ConfigError(f"{cw}: 'active' and 'inactive' must be lists ({exc})") from None
        if any(t > finish for t in inactive):
            raise ConfigError(f"{cw}: an 'inactive' time is after finish_time ({finish:g})")
        if len(active) != len(inactive):
            raise ConfigError(
                f"{cw}: {len(active)} 'active' times but {len(inactive)} 'inactive' ones"
            )
        intervals = tuple(zip(active, inactive, strict=True))
        if any(b <= a for a, b in intervals) or any(
            intervals[i + 1][0] < intervals[i][1] for i in range(len(intervals) - 1)
        ):
            raise ConfigError(f"{cw}: active/inactive times must alternate and increase")
        clients.append((str(client), intervals, finish))
    return Availability(tuple(clients), scale, offset, str(path.name))


def parse_network(
    raw: Any, base_dir: Path, devices: list[str], overlays: list[str]
) -> NetworkConfig:
    """Validate the ``[network]`` table (``raw``); ``base_dir`` resolves trace file paths."""
    if raw is None or raw == {}:
        return NetworkConfig()
    if not isinstance(raw, dict):
        raise ConfigError("[network] must be a table")
    known = (
        "seed",
        "rto_s",
        "trace",
        "nodes",
        "events",
        "duty_cycle",
        "availability",
        *LINK_CLASSES,
    )
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[network]: unknown key(s) {unknown}; known: {sorted(known)}")
    seed = None
    if "seed" in raw:
        if isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int):
            raise ConfigError(f"network.seed: expected an integer, got {raw['seed']!r}")
        seed = raw["seed"]
    rto = _number("network.rto_s", raw.get("rto_s", 0.2), positive=True)
    classes = []
    for name in LINK_CLASSES:
        if name in raw:
            if not isinstance(raw[name], dict):
                raise ConfigError(f"[network.{name}] must be a table")
            classes.append(
                (name, LinkConditions().updated(_link_values(f"network.{name}", raw[name])))
            )
    node_ids = {"server", *devices, *overlays}
    nodes: list[tuple[str, tuple[tuple[str, float], ...]]] = []
    speeds: list[tuple[str, float]] = []
    tables = raw.get("nodes", {})
    if not isinstance(tables, dict):
        raise ConfigError("[network.nodes] must be a table of node tables")
    for node, table in tables.items():
        where = f"network.nodes.{node}"
        if node not in node_ids:
            raise ConfigError(
                f"{where}: {node!r} is not a node of this fleet "
                f"(server, {devices[0]}..{devices[-1]}, {overlays[0]}..)"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}] must be a table")
        values = _link_values(where, table, extra=("compute_speed",))
        nodes.append((node, tuple(sorted(values.items()))))
        if "compute_speed" in table:
            if node not in devices:
                raise ConfigError(f"{where}.compute_speed: only devices have a compute speed")
            speeds.append(
                (node, _number(f"{where}.compute_speed", table["compute_speed"], positive=True))
            )
    events: list[NetEvent] = []
    entries = raw.get("events", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("network.events must be an array of tables ([[network.events]])")
    events += [_event(f"network.events[{i}]", e) for i, e in enumerate(entries)]
    if "trace" in raw:
        if not isinstance(raw["trace"], str):
            raise ConfigError(f"network.trace: expected a CSV file's path, got {raw['trace']!r}")
        events += _read_trace_csv("network.trace", (base_dir / raw["trace"]).resolve())
    cycles = []
    entries = raw.get("duty_cycle", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("network.duty_cycle must be an array of tables ([[network.duty_cycle]])")
    for i, entry in enumerate(entries):
        where = f"network.duty_cycle[{i}]"
        unknown = sorted(set(entry) - {"target", "period_s", "on_s", "phase"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}; known: ['on_s', 'period_s', 'phase', 'target']"
            )
        for key in ("target", "period_s", "on_s"):
            if key not in entry:
                raise ConfigError(f"{where}: missing key {key!r}")
        period = _number(f"{where}.period_s", entry["period_s"], positive=True)
        on = _number(f"{where}.on_s", entry["on_s"], positive=True)
        if on >= period:
            raise ConfigError(f"{where}.on_s: must be shorter than period_s ({period:g})")
        phase = entry.get("phase", "random")
        if phase not in ("random", "aligned"):
            raise ConfigError(f"{where}.phase: {phase!r} is not one of 'random', 'aligned'")
        if not isinstance(entry["target"], str):
            raise ConfigError(f"{where}.target: expected a node id or link class")
        cycles.append(DutyCycle(entry["target"], period, on, phase, where))
    availability = None
    if "availability" in raw:
        if not isinstance(raw["availability"], dict):
            raise ConfigError("[network.availability] must be a table")
        availability = _availability("network.availability", raw["availability"], base_dir)
    config = NetworkConfig(
        raw=raw,
        classes=tuple(classes),
        nodes=tuple(nodes),
        compute_speed=tuple(speeds),
        events=tuple(events),
        duty_cycles=tuple(cycles),
        availability=availability,
        seed=seed,
        rto_s=rto,
        scenario_nodes=tuple(sorted(node_ids)),
    )
    # Resolve every target now, so that a typo fails before anything starts.
    config.timeline(
        {"device": devices, "overlay": overlays, "server": ["server"]},
        seed=seed or 0,
        horizon_s=0.0,
    )
    return config
