"""The topic grammar: one place that builds and parses every MQTT topic of emo-mqtt.

Every topic is rooted at a run, ``emo/<run>/...``. Below the run, the tree mirrors the
cache tiers of EMO: what devices publish lives under ``device/<id>/`` (the device tier),
what overlays publish under ``overlay/<id>/`` (the overlay tier), what the server publishes
under ``server/`` (the server tier), next to the ``control`` and ``infer`` branches.
Naming by source keeps least-privilege ACLs simple: a node may publish only below its own id.

Everything that is JSON for people and monitoring tools lives under one branch,
``emo/<run>/telemetry/``: node statuses (``telemetry/status/<role>/<id>``), node metrics
(``telemetry/metrics/<role>/<id>``) and the run's retained state (``telemetry/run``). One
wildcard, ``emo/+/telemetry/#``, subscribes to all of it and to none of the binary codec
frames (weights, activations) that share the run's prefix; it is also the one read grant
of the ``monitor`` identity in the provisioned ACLs.

This module is pure: no I/O, no asyncio, no MQTT. ``docs/topics.md`` is generated from
:data:`SPECS` (``emo topics --markdown``) and a test keeps the two in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from emo_mqtt.errors import TopicError

ROOT = "emo"
#: The branch below ``emo/<run>/`` that holds every JSON (telemetry) topic, and only those.
TELEMETRY = "telemetry"

#: Run, node and client ids: safe in topics, file names and ACL patterns.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Kind(StrEnum):
    """Every kind of topic in the system."""

    DEVICE_UPDATE = "device.update"
    DEVICE_ACTIVATIONS = "device.activations"
    DEVICE_SFL_ACTIVATIONS = "device.sfl_activations"
    OVERLAY_MODEL = "overlay.model"
    SERVER_ROUND = "server.round"
    SERVER_SFL_GRADIENTS = "server.sfl_gradients"
    SERVER_DONE = "server.done"
    CONTROL = "control"
    STATUS = "status"
    METRICS = "metrics"
    RUN_STATE = "run"
    INFER_REQUEST = "infer.request"
    INFER_RESPONSE = "infer.response"
    BENCH = "bench"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One row of the topic table: its shape below ``emo/<run>/`` and how it is used."""

    kind: Kind
    #: Pattern below ``emo/<run>/``; ``{node}`` is a node id, ``{role}`` a role name.
    pattern: str
    tier: str
    publisher: str
    subscribers: str
    qos: int
    retained: bool
    payload: str


SPECS: tuple[TopicSpec, ...] = (
    TopicSpec(
        Kind.DEVICE_UPDATE,
        "device/{node}/update",
        "device",
        "device `{node}`",
        "server",
        1,
        False,
        "codec `update`: FL round, trunk+head weights, sample count, train loss",
    ),
    TopicSpec(
        Kind.DEVICE_ACTIVATIONS,
        "device/{node}/activations",
        "device",
        "device `{node}` (its outbox)",
        "the overlay serving `{node}`",
        1,
        False,
        "codec `activations`: cut-layer activations (fp32/fp16/int8), labels, "
        "sample ids, FL round; chunked when large",
    ),
    TopicSpec(
        Kind.DEVICE_SFL_ACTIVATIONS,
        "device/{node}/sfl/activations",
        "device",
        "device `{node}` (SplitFed baseline)",
        "server",
        1,
        False,
        "codec `sfl.activations`: one batch of cut-layer activations and labels",
    ),
    TopicSpec(
        Kind.OVERLAY_MODEL,
        "overlay/{node}/model",
        "overlay",
        "overlay `{node}`",
        "server",
        1,
        False,
        "codec `overlay.model`: overlay model weights (fp16), version, FL round, loss; "
        "chunked (larger than one frame, hence not retained)",
    ),
    TopicSpec(
        Kind.SERVER_ROUND,
        "server/round",
        "server",
        "server",
        "devices, overlays",
        1,
        True,
        "codec `round`: round number, sampled devices, deadline, the global model to start from",
    ),
    TopicSpec(
        Kind.SERVER_SFL_GRADIENTS,
        "server/sfl/{node}/gradients",
        "server",
        "server (SplitFed baseline)",
        "device `{node}`",
        1,
        False,
        "codec `sfl.gradients`: gradient of the loss w.r.t. one batch's activations",
    ),
    TopicSpec(
        Kind.SERVER_DONE,
        "server/done",
        "server",
        "server",
        "every node",
        1,
        True,
        "codec `done`: the run is over: final round, final global model, reason",
    ),
    TopicSpec(
        Kind.CONTROL,
        "control/{node}",
        "control",
        "server (controller)",
        "device `{node}`",
        1,
        True,
        "codec `control`: activation fraction, precision, interval, reason",
    ),
    TopicSpec(
        Kind.STATUS,
        "telemetry/status/{role}/{node}",
        "telemetry",
        "every node (last will: offline)",
        "dashboards, the server",
        1,
        True,
        "JSON: state (online/offline), role, id, run, version, round, time; the server's "
        "also `incarnation` (which start of the run's server: `emo_mqtt/incarnation.py`)",
    ),
    TopicSpec(
        Kind.METRICS,
        "telemetry/metrics/{role}/{node}",
        "telemetry",
        "every node",
        "dashboards, `emo run`",
        0,
        False,
        "JSON: counters and gauges of the node (QoS 1 for events and the final message; "
        "the final one, sent when the node stops, is retained)",
    ),
    TopicSpec(
        Kind.RUN_STATE,
        "telemetry/run",
        "telemetry",
        "server",
        "dashboards",
        1,
        True,
        "JSON: the run's state (`live`, `finished`, `interrupted`), algorithm, round k of N, "
        "accuracy per round, the devices sampled this round, the overlay of each device",
    ),
    TopicSpec(
        Kind.INFER_REQUEST,
        "infer/{node}/request",
        "infer",
        "any client `{node}`",
        "inference service",
        1,
        False,
        "codec `infer.request`: request id, input images",
    ),
    TopicSpec(
        Kind.INFER_RESPONSE,
        "infer/{node}/response",
        "infer",
        "inference service",
        "client `{node}`",
        1,
        False,
        "codec `infer.response`: request id, class probabilities",
    ),
    TopicSpec(
        Kind.BENCH,
        "bench/{node}",
        "bench",
        "`emo bench bus`",
        "`emo bench bus`",
        1,
        False,
        "codec `bench`: one tensor of the requested size",
    ),
)

_BY_KIND: dict[Kind, TopicSpec] = {spec.kind: spec for spec in SPECS}
ROLES = frozenset({"device", "overlay", "server", "dashboard", "client", "bench"})


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid run/node id, else raise :class:`TopicError`."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value


def _render(kind: Kind, run: str, node: str | None, role: str | None, wildcard: bool) -> str:
    """Fill ``kind``'s pattern; a missing part is ``+`` when ``wildcard``, else an error."""
    parts = {"node": node, "role": role}
    rendered = [ROOT, validate_id(run, "run")]
    for piece in _BY_KIND[kind].pattern.split("/"):
        if not piece.startswith("{"):
            rendered.append(piece)
            continue
        name = piece[1:-1]
        value = parts[name]
        if value is None:
            if not wildcard:
                raise TopicError(f"topic {kind.value} needs a {name}")
            rendered.append("+")
            continue
        if name == "role" and value not in ROLES:
            raise TopicError(f"unknown role {value!r}; known: {sorted(ROLES)}")
        rendered.append(validate_id(value, name))
    return "/".join(rendered)


def topic(kind: Kind, run: str, node: str | None = None, role: str | None = None) -> str:
    """Build the concrete topic of ``kind`` for ``run`` (and ``node``/``role`` where needed)."""
    return _render(kind, run, node, role, wildcard=False)


def subscription(kind: Kind, run: str, node: str | None = None, role: str | None = None) -> str:
    """A topic filter for ``kind``: like :func:`topic`, with ``+`` for parts left out."""
    return _render(kind, run, node, role, wildcard=True)


def run_filter(run: str) -> str:
    """The filter that matches every topic of ``run``."""
    return f"{ROOT}/{validate_id(run, 'run')}/#"


def telemetry_filter(run: str | None = None) -> str:
    """The filter that matches every JSON topic of ``run`` (of every run when ``None``):
    statuses, metrics and run states, and no codec frame."""
    shown = "+" if run is None else validate_id(run, "run")
    return f"{ROOT}/{shown}/{TELEMETRY}/#"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What :func:`parse` learns from a topic."""

    kind: Kind
    run: str
    node: str | None = None
    role: str | None = None


def parse(value: str) -> ParsedTopic:
    """Parse a concrete topic into its kind, run and node; :class:`TopicError` if foreign."""
    parts = value.split("/")
    if len(parts) < 3 or parts[0] != ROOT:
        raise TopicError(f"not an emo-mqtt topic: {value!r}")
    run = validate_id(parts[1], "run")
    rest = parts[2:]
    for spec in SPECS:
        pattern = spec.pattern.split("/")
        if len(pattern) != len(rest):
            continue
        found: dict[str, str] = {}
        for want, got in zip(pattern, rest, strict=True):
            if want.startswith("{"):
                if not _ID_RE.fullmatch(got):
                    break
                found[want[1:-1]] = got
            elif want != got:
                break
        else:
            role = found.get("role")
            if role is not None and role not in ROLES:
                raise TopicError(f"unknown role {role!r} in topic {value!r}")
            return ParsedTopic(spec.kind, run, found.get("node"), role)
    raise TopicError(f"unknown emo-mqtt topic: {value!r}")


#: Topic kinds whose publisher is not named in the topic: the server side's.
_SERVER_SIDE = frozenset(
    {
        Kind.SERVER_ROUND,
        Kind.SERVER_SFL_GRADIENTS,
        Kind.SERVER_DONE,
        Kind.CONTROL,
        Kind.INFER_RESPONSE,
        Kind.RUN_STATE,
    }
)
_ROLE_OF = {
    Kind.DEVICE_UPDATE: "device",
    Kind.DEVICE_ACTIVATIONS: "device",
    Kind.DEVICE_SFL_ACTIVATIONS: "device",
    Kind.OVERLAY_MODEL: "overlay",
    Kind.INFER_REQUEST: "client",
    Kind.BENCH: "bench",
}


@lru_cache(maxsize=4096)
def publisher_key(value: str) -> str:
    """Who is accountable for a message on topic ``value``, as ``<role>/<id>``.

    Topics are named by their publisher and the provisioned ACLs let each identity write
    only below its own id, so the topic says who sent a message: ``device/dev03/update``,
    ``telemetry/status/device/dev03`` and ``telemetry/metrics/device/dev03`` all give
    ``device/dev03``, in any
    run. Whatever the server side publishes gives ``server``. A foreign topic is its own
    key. What receivers use to give each sender its own budget (chunk reassembly).
    """
    try:
        where = parse(value)
    except TopicError:
        return value
    if where.kind in _SERVER_SIDE:
        return "server"
    role = where.role if where.role is not None else _ROLE_OF[where.kind]
    return f"{role}/{where.node}"


def matches(topic_filter: str, value: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest), as a broker does it."""
    fparts = topic_filter.split("/")
    tparts = value.split("/")
    for i, f in enumerate(fparts):
        if f == "#":
            # "$SYS"-style topics are never matched by a leading wildcard (MQTT 4.7.2).
            return not (i == 0 and value.startswith("$"))
        if i >= len(tparts):
            return False
        if f == "+":
            if i == 0 and value.startswith("$"):
                return False
            continue
        if f != tparts[i]:
            return False
    return len(fparts) == len(tparts)


def validate_filter(topic_filter: str) -> str:
    """Check a subscription filter's wildcard syntax; return it or raise :class:`TopicError`."""
    if not topic_filter or len(topic_filter.encode()) > 65535 or "\x00" in topic_filter:
        raise TopicError(f"invalid topic filter {topic_filter!r}")
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if "#" in part and (part != "#" or i != len(parts) - 1):
            raise TopicError(f"'#' must be a whole last level: {topic_filter!r}")
        if "+" in part and part != "+":
            raise TopicError(f"'+' must be a whole level: {topic_filter!r}")
    return topic_filter


def markdown_table() -> str:
    """The topic table of ``docs/topics.md``, generated from :data:`SPECS`."""
    lines = [
        "| topic (below `emo/<run>/`) | tier | publisher | subscribers | QoS | retained "
        "| payload |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SPECS:
        lines.append(
            f"| `{s.pattern}` | {s.tier} | {s.publisher} | {s.subscribers} | {s.qos} | "
            f"{'yes' if s.retained else 'no'} | {s.payload} |"
        )
    return "\n".join(lines) + "\n"
