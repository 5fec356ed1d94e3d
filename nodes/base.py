"""What every node shares: its bus, status and metrics, and a message loop that never crashes.

A node talks to the rest of the fleet only through its bus, which it is given
(:func:`node_bus` builds one). Incoming messages are parsed by the topic grammar, decoded by
the codec and validated into typed messages (:mod:`emo_mqtt.messages`); anything malformed,
from another run, on an unknown topic, of the wrong kind, or a duplicate (QoS 1
redelivery) is rejected, counted by kind and reason and logged once, and the loop carries
on. The loop is supervised: should it die anyway, the node fails (:class:`NodeFailed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from emo_mqtt import __version__, codec
from emo_mqtt.bus import Bus, BusOptions, Message, open_bus
from emo_mqtt.config import RunConfig
from emo_mqtt.errors import CodecError, EmoError, PublishTimeout, TopicError
from emo_mqtt.incarnation import IncarnationTracker
from emo_mqtt.messages import TOPIC_MESSAGES, MessageError, check_kind
from emo_mqtt.topics import Kind, ParsedTopic, parse, topic

log = logging.getLogger("emo_mqtt.nodes")

Handler = Callable[[ParsedTopic, codec.Envelope, Any], Awaitable[None]]
#: Turns a received body into a typed message (raises MessageError); gets the topic too.
Parser = Callable[[Mapping[str, Any], ParsedTopic], Any]
JsonHandler = Callable[[ParsedTopic, dict[str, Any]], Awaitable[None]]
#: Tries of the ``online`` status publish at start (each bounded by the bus's deadline).
STATUS_ATTEMPTS = 3
#: Topics whose payloads are JSON (readable by any MQTT tool), not codec frames.
JSON_KINDS = frozenset({Kind.STATUS, Kind.METRICS, Kind.RUN_STATE})

#: What the server side sends: these carry the server's incarnation, and the other nodes
#: take them only from the incarnation they follow (:mod:`emo_mqtt.incarnation`).
SERVER_SIDE_KINDS = frozenset(
    {Kind.SERVER_ROUND, Kind.SERVER_DONE, Kind.CONTROL, Kind.SERVER_SFL_GRADIENTS}
)

#: Which "kind of bytes" each topic's payload counts as in summaries.
BYTE_KINDS: dict[Kind, str] = {
    Kind.DEVICE_UPDATE: "weights",
    Kind.SERVER_ROUND: "weights",
    Kind.SERVER_DONE: "weights",
    Kind.OVERLAY_MODEL: "weights",
    Kind.DEVICE_ACTIVATIONS: "activations",
    Kind.DEVICE_SFL_ACTIVATIONS: "activations",
    Kind.SERVER_SFL_GRADIENTS: "gradients",
    Kind.CONTROL: "control",
    Kind.STATUS: "status",
    Kind.METRICS: "metrics",
    Kind.RUN_STATE: "metrics",
    Kind.INFER_REQUEST: "inference",
    Kind.INFER_RESPONSE: "inference",
    Kind.BENCH: "bench",
}


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Clear ``event``, then wait at most ``timeout`` seconds for it; whether it was set.

    Callers check their condition, call this, and check again: a change between the check
    and the clear is caught at the latest after ``timeout``, which they keep short.
    """
    event.clear()
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def bytes_by_kind(bytes_out_by_topic: Mapping[str, int]) -> dict[str, int]:
    """Fold a bus's per-topic byte counters into the kinds of :data:`BYTE_KINDS`."""
    out: dict[str, int] = {}
    for name, count in bytes_out_by_topic.items():
        try:
            kind = BYTE_KINDS[parse(name).kind]
        except TopicError:
            kind = "other"
        out[kind] = out.get(kind, 0) + count
    return out


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``.

    ``json.dumps`` writes NaN as a bare ``NaN``, which is not JSON: Grafana, Node-RED and
    browsers refuse the whole message. A missing figure is ``null`` instead.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def status_payload(
    state: str, role: str, node_id: str, run: str, round: int = 0, incarnation: str | None = None
) -> bytes:
    """The retained status JSON of a node (its last will says ``offline``).

    ``incarnation``: the server's own start, or the one a device or overlay follows
    (:mod:`emo_mqtt.incarnation`); absent from the last will, written before any is known.
    """
    body: dict[str, Any] = {
        "state": state,
        "role": role,
        "id": node_id,
        "run": run,
        "version": __version__,
        "round": round,
        "time": time.time(),
    }
    if incarnation is not None:
        body["incarnation"] = incarnation
    return json.dumps(body).encode()


def node_bus(
    broker: Any, run: str, role: str, node_id: str, options: BusOptions | None = None
) -> Bus:
    """The bus a node of ``run`` connects with: its client id, its last will, its session.

    ``broker`` is an ``mqtt://`` URL or a :class:`~emo_mqtt.bus.MemoryBroker`. Nodes are
    given their bus (``ServerNode(node_bus(...), ...)``): tests and tools can hand them any
    :class:`Bus`.
    """
    status = topic(Kind.STATUS, run, node=node_id, role=role)
    will = Message(status, status_payload("offline", role, node_id, run), 1, True)
    # A persistent session (clean_start False): QoS 1 messages queued while we are away wait
    # for us. A shaped run sizes publish deadlines to the node's link and outages (options).
    return open_bus(
        broker,
        f"{run}-{role}-{node_id}",
        will=will,
        clean_start=False,
        options=options or BusOptions(),
    )


class NodeFailed(EmoError):
    """A node's message loop or its main task died: the node stops and says so."""


class Node:
    """Base class of the server, overlay and device nodes."""

    role = "node"

    def __init__(self, bus: Bus, config: RunConfig, run: str, node_id: str) -> None:
        """``bus``: this node's own connection, not yet connected (see :func:`node_bus`)."""
        self.config = config
        self.run = run
        self.node_id = node_id
        self.status_topic = topic(Kind.STATUS, run, node=node_id, role=self.role)
        self.bus = bus
        # The broker published our will ("offline") when the connection dropped: say we
        # are back, or the server and dashboards would count us offline for good.
        self.bus.on_reconnected = lambda: self.spawn(self.publish_status("online"))
        self.handlers: dict[Kind, tuple[Parser, Handler]] = {}
        self.json_handlers: dict[Kind, JsonHandler] = {}
        #: Message kinds whose handler failed once (logged with a traceback once each).
        self._handler_failures: set[str] = set()
        self._seq = 0
        self._seen: OrderedDict[tuple[str, int, float], None] = OrderedDict()
        self.round = 0
        #: Which start of the run's server this node follows (devices and overlays; the
        #: server has its own ``incarnation``). ``emo run`` pins it (:meth:`pin_incarnation`).
        self.incarnations = IncarnationTracker()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        #: Bounds how many nodes connect and subscribe at once (shared by a fleet's nodes;
        #: None: no bound). See :func:`emo_mqtt.placement.start_concurrency`.
        self.start_gate: asyncio.Semaphore | None = None
        #: Payload bytes of the whole messages this node received, by kind of bytes (chunks
        #: reassembled, so chunk headers are not counted: the bus's ``received_bytes`` does).
        self.bytes_in_by_kind: dict[str, int] = {}
        #: (time, messages out, bytes out) when the previous metrics message was built.
        self._last_rates: tuple[float, int, int] = (self.started, 0, 0)

    # -- outgoing ---------------------------------------------------------------------------
    def _status_payload(self, state: str) -> bytes:
        return status_payload(
            state, self.role, self.node_id, self.run, self.round, self.status_incarnation()
        )

    def status_incarnation(self) -> str:
        """The incarnation a status names: the one this node follows ("" before any)."""
        return self.incarnations.current or ""

    async def send(
        self,
        kind: Kind,
        body: Mapping[str, Any],
        *,
        msg_kind: str,
        node: str | None = None,
        retain: bool = False,
        qos: int = 1,
        background: bool = False,
    ) -> None:
        """Encode ``body`` in an envelope from this node and publish it on ``kind``'s topic.

        ``background``: bulk data that yields to this node's other messages on its link
        (:meth:`emo_mqtt.bus.Bus.publish`).
        """
        self._seq += 1
        frame = codec.encode(body, kind=msg_kind, sender=self.node_id, run=self.run, seq=self._seq)
        await self.bus.publish(
            topic(kind, self.run, node=node), frame, qos=qos, retain=retain, background=background
        )

    async def publish_status(self, state: str, *, attempts: int = 1) -> None:
        """Publish this node's retained status; with ``attempts`` > 1, a publish that times
        out (a broker busy with a thousand connecting clients) is tried again, and the last
        failure is logged instead of raised: a status is for dashboards and the server's
        start wait, and a late one must never end the run."""
        for attempt in range(1, attempts + 1):
            try:
                await self.bus.publish(self.status_topic, self._status_payload(state), retain=True)
                return
            except PublishTimeout as exc:
                if attempts == 1:
                    raise
                log.warning(
                    "%s %s: status %r not acknowledged (attempt %d/%d): %s",
                    self.role,
                    self.node_id,
                    state,
                    attempt,
                    attempts,
                    exc,
                )

    def metrics(self) -> dict[str, Any]:
        """The node's metrics as a JSON-ready dict; subclasses add their own.

        Names carry their unit (``_bytes``, ``_s``, ``_per_s``); docs/monitoring.md lists
        them all. ``bytes_out``/``bytes_in`` keep their historical names (bytes).
        """
        s = self.bus.stats
        now = time.monotonic()
        uptime = max(now - self.started, 1e-9)
        last_t, last_msgs, last_bytes = self._last_rates
        window = max(now - last_t, 1e-9)
        self._last_rates = (now, s.published_messages, s.published_bytes)
        return {
            "role": self.role,
            "id": self.node_id,
            "run": self.run,
            "round": self.round,
            "time": time.time(),
            "uptime_s": round(uptime, 3),
            "bytes_out": s.published_bytes,
            "bytes_out_by_kind": bytes_by_kind(s.bytes_out_by_topic),
            "bytes_in": s.received_bytes,
            "bytes_in_by_kind": dict(sorted(self.bytes_in_by_kind.items())),
            "messages_out": s.published_messages,
            "messages_in": s.received_messages,
            "publish_rate_messages_per_s": round(s.published_messages / uptime, 3),
            "publish_rate_bytes_per_s": round(s.published_bytes / uptime, 1),
            "recent_publish_rate_messages_per_s": round(
                (s.published_messages - last_msgs) / window, 3
            ),
            "recent_publish_rate_bytes_per_s": round((s.published_bytes - last_bytes) / window, 1),
            "rejected": dict(s.rejected),
            "reconnects": s.reconnects,
        }

    async def publish_metrics(self, *, final: bool = False, **extra: Any) -> None:
        """Publish the metrics JSON; the final one at QoS 1, since summaries are built on it,
        and retained: a dashboard opened after the run still reads each node's last counters
        (``emo run`` clears them before a new run under the same id)."""
        body = json_safe({**self.metrics(), **extra, "final": final})
        payload = json.dumps(body, allow_nan=False).encode()
        await self.bus.publish(
            topic(Kind.METRICS, self.run, node=self.node_id, role=self.role),
            payload,
            # Events (round closed, run done) and final counters feed summaries: QoS 1.
            qos=1 if final or "event" in extra else 0,
            retain=final,
        )

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (typically a publish) beside the message loop.

        Handlers must not await a publish: while the inbox is full the bus stops reading its
        socket, so the broker's acknowledgement would wait behind the very messages the
        handler keeps the loop from draining.
        """
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def cancel_background(self) -> None:
        """Cancel the work started with :meth:`spawn` (publishes in flight): a crash, or a
        stop that must not wait for them."""
        for task in list(self._tasks):
            task.cancel()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "%s %s: background publish failed: %r", self.role, self.node_id, task.exception()
            )

    # -- incoming ---------------------------------------------------------------------------
    def on(self, kind: Kind, parse_body: Parser, handler: Handler) -> None:
        """Handle frames on ``kind``'s topics: ``parse_body(body, where)`` validates the body
        into a typed message (or raises :class:`MessageError`), then
        ``handler(where, envelope, message)`` runs."""
        self.handlers[kind] = (parse_body, handler)

    def on_json(self, kind: Kind, handler: JsonHandler) -> None:
        self.json_handlers[kind] = handler

    def reject_message(self, kind: str, reason: str, where: str, detail: str) -> None:
        """Count a refused message as ``<kind>:<reason>`` (the metrics' ``rejected``)."""
        self.bus.reject(f"{kind}:{reason}", where, detail)

    async def _dispatch_json(self, where: ParsedTopic, message: Message) -> None:
        handler = self.json_handlers.get(where.kind)
        if handler is None or where.run != self.run:
            self.bus.reject("unexpected_topic", message.topic, "no handler for this topic")
            return
        try:
            body = json.loads(bytes(message.payload))
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: JSON nested thousands deep (json.loads recurses).
            self.bus.reject("bad_json", message.topic, f"{type(exc).__name__}: {exc}")
            return
        await self._run_handler(where.kind, message.topic, handler(where, body))

    async def _run_handler(self, kind: str, where: str, work: Awaitable[None]) -> None:
        """Await a handler; an exception it raises is logged and counted, never propagated.

        Messages are validated before their handler runs, so this is a safety net for what
        validation could not foresee: one message must never end the node's loop.
        """
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log_failure(kind, where)
            self.bus.reject(f"{kind}:handler_error", where, f"{type(exc).__name__}: {exc}")

    def _log_failure(self, kind: str, where: str) -> None:
        """Log the exception being handled with its traceback, once per message kind."""
        if kind not in self._handler_failures:
            self._handler_failures.add(kind)
            log.exception(
                "%s %s: a message of kind %s on %s raised (further ones are "
                "counted in the metrics' rejected)",
                self.role,
                self.node_id,
                kind,
                where,
            )

    def _duplicate(self, envelope: codec.Envelope) -> bool:
        key = (envelope.sender, envelope.seq, envelope.time)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > 50_000:
            self._seen.popitem(last=False)
        return False

    def _count_in(self, kind: str, message: Message) -> None:
        self.bytes_in_by_kind[kind] = self.bytes_in_by_kind.get(kind, 0) + len(message.payload)

    async def dispatch(self, message: Message) -> None:
        """Route one message to its handler; bad input is counted, never raised.

        Order: topic grammar, run, codec frame, the frame's kind against the topic's, the
        envelope's run, duplicates, then the body's validation into a typed message
        (:mod:`emo_mqtt.messages`): a handler only ever sees a valid message.
        """
        if not message.payload:
            return  # an empty retained payload: MQTT's way of clearing a retained message
        try:
            where = parse(message.topic)
        except TopicError as exc:
            self._count_in("other", message)
            self.bus.reject("unknown_topic", message.topic, str(exc))
            return
        self._count_in(BYTE_KINDS.get(where.kind, "other"), message)
        if where.kind in JSON_KINDS:
            await self._dispatch_json(where, message)
            return
        entry = self.handlers.get(where.kind)
        if entry is None or where.run != self.run:
            self.bus.reject("unexpected_topic", message.topic, "no handler for this topic")
            return
        parse_body, handler = entry
        try:
            envelope = codec.decode(message.payload)
        except CodecError as exc:
            self.bus.reject("bad_payload", message.topic, str(exc))
            return
        expected = TOPIC_MESSAGES[where.kind].KIND
        try:
            check_kind(envelope.kind, expected)
        except MessageError as exc:
            self.reject_message(expected, exc.reason, message.topic, exc.detail)
            return
        if envelope.run != self.run:
            self.bus.reject("wrong_run", message.topic, f"envelope run {envelope.run!r}")
            return
        if self._duplicate(envelope):
            self.bus.reject("duplicate", message.topic, "already processed (QoS 1 redelivery)")
            return
        try:
            typed = parse_body(envelope.body, where)
        except MessageError as exc:
            self.reject_message(expected, exc.reason, message.topic, exc.detail)
            self.on_invalid(where, envelope, exc)
            return
        except Exception as exc:  # a validator's own bug: still never the loop's end
            self._log_failure(expected, message.topic)
            self.reject_message(expected, "validation_error", message.topic, repr(exc))
            return
        if not self._admit_incarnation(where, typed, expected, message):
            return
        await self._run_handler(expected, message.topic, handler(where, envelope, typed))

    def pin_incarnation(self, incarnation: str) -> None:
        """Take server-side messages of ``incarnation`` only (the run's launcher knows it)."""
        self.incarnations = IncarnationTracker(pinned=incarnation)

    def on_new_incarnation(self, incarnation: str) -> None:
        """Hook: a newer start of the server (or the first one seen) is now followed;
        subclasses start their round tracking over."""

    def _admit_incarnation(
        self, where: ParsedTopic, typed: Any, kind: str, message: Message
    ) -> bool:
        """Whether a server-side message is of the incarnation this node follows."""
        if self.role == "server" or where.kind not in SERVER_SIDE_KINDS:
            return True
        incarnation = str(getattr(typed, "incarnation", ""))
        verdict = self.incarnations.admit(
            incarnation, ends_run=where.kind is Kind.SERVER_DONE, retained=message.retain
        )
        if verdict.reason is not None:
            self.reject_message(kind, verdict.reason, message.topic, f"incarnation {incarnation!r}")
            return False
        if verdict.switched:
            log.info("%s %s: following server start %s", self.role, self.node_id, incarnation)
            self.on_new_incarnation(incarnation)
        return True

    def on_invalid(self, where: ParsedTopic, envelope: codec.Envelope, error: MessageError) -> None:
        """Hook: a frame on ``where`` failed validation (already counted). Subclasses may
        flag the sender (the server flags poisoned overlays)."""

    async def serve(self) -> None:
        """The message loop: dispatch until :meth:`stop`."""
        async for message in self.bus.messages():
            await self.dispatch(message)
            if self.stopping.is_set():
                return

    async def subscriptions(self) -> list[str]:
        """Topic filters this node subscribes to (subclasses)."""
        return []

    async def main(self) -> None:
        """Subclasses run their algorithm here, while :meth:`serve` handles messages."""
        await self.stopping.wait()

    def stop(self) -> None:
        self.stopping.set()

    async def before_goodbye(self) -> None:
        """Publish what must precede the final metrics and the offline status (subclasses;
        runs however the node stops)."""

    async def run_node(self) -> None:
        """Connect, announce, run until done, say goodbye (no will on a clean exit).

        Supervised: when the message loop ends before :meth:`main` (an exception, or the bus
        closed under it) the node logs it, stops its main task and raises
        :class:`NodeFailed`, so that whoever runs it (``emo run``, ``emo node``) fails
        loudly instead of waiting for rounds that can no longer be served.
        """
        async with self.start_gate or contextlib.nullcontext():
            # Paced (emo run's fleets share a gate): a thousand clients connecting,
            # subscribing and announcing at once flood the broker and our own event loop.
            await self.bus.connect()
        async with self.bus:
            async with self.start_gate or contextlib.nullcontext():
                for topic_filter in await self.subscriptions():
                    await self.bus.subscribe(topic_filter)
            self.spawn(self.publish_status("online", attempts=STATUS_ATTEMPTS))
            log.info(
                "%s %s: connected, online as %s (run %s)",
                self.role,
                self.node_id,
                self.bus.client_id,
                self.run,
            )
            name = f"{self.role}:{self.node_id}"
            loop = asyncio.create_task(self.serve(), name=f"{name}:serve")
            work = asyncio.create_task(self.main(), name=f"{name}:main")
            try:
                await asyncio.wait({loop, work}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    if loop.cancelled() or loop.exception() is None:
                        if not self.stopping.is_set():
                            raise NodeFailed(f"{name}: the message loop ended (bus closed)")
                    else:
                        exc = loop.exception()
                        log.error("%s: the message loop died: %r", name, exc, exc_info=exc)
                        raise NodeFailed(f"{name}: the message loop died: {exc!r}") from exc
                await work  # re-raises what main raised
            finally:
                self.stop()
                for task in (loop, work):
                    task.cancel()
                await asyncio.gather(loop, work, return_exceptions=True)
                try:
                    await self.before_goodbye()
                    await self.publish_metrics(final=True)
                    await self.publish_status("offline")
                except EmoError as exc:
                    log.warning("%s %s: could not say goodbye: %s", self.role, self.node_id, exc)
