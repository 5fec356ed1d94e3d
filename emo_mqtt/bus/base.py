"""The bus interface every node talks through, and the logic its implementations share.

A :class:`Bus` publishes byte payloads to topics and yields whole messages from its
subscriptions. Payloads above ``chunk_size`` are split into chunk frames
(:mod:`emo_mqtt.chunking`) that travel on the same topic and are reassembled before
:meth:`Bus.messages` yields them, so callers never see a chunk. Two implementations:
:class:`~emo_mqtt.bus.mqtt.MqttBus` (the only module that imports aiomqtt) and
:class:`~emo_mqtt.bus.memory.MemoryBus` (in-process, for fast unit tests).

Chunk frames go to the reassembler as they arrive (its own limits bound what it holds);
whole messages wait in a bounded inbox (``inbox_max_frames`` counts them: an unchunked
message is one frame). When it fills, the bus applies backpressure
(:meth:`Bus._pause_reading`): the MQTT bus stops reading its socket, so TCP flow control
pushes back to the broker, which holds QoS 1 messages for us. Nothing is dropped
silently in the bus; every rejected frame is counted by reason in :attr:`Bus.stats`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Self

from emo_mqtt.chunking import BUDGET_REASONS, HEADER_SIZE, Reassembler, is_chunk_frame, split
from emo_mqtt.errors import BusError, ChunkError, PublishTimeout
from emo_mqtt.topics import publisher_key, validate_filter

log = logging.getLogger("emo_mqtt.bus")

Payload = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Message:
    """One whole message as a subscriber sees it (chunks already reassembled)."""

    topic: str
    payload: bytes | bytearray
    qos: int = 1
    retain: bool = False


@dataclass
class BusStats:
    """Counters of one bus client. ``bytes`` count MQTT payload bytes, chunk headers included."""

    published_messages: int = 0
    published_frames: int = 0
    published_bytes: int = 0
    republished_frames: int = 0
    received_messages: int = 0
    received_frames: int = 0
    received_bytes: int = 0
    reconnects: int = 0
    pauses: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    bytes_out_by_topic: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the counters."""
        return {
            "published_messages": self.published_messages,
            "published_frames": self.published_frames,
            "published_bytes": self.published_bytes,
            "republished_frames": self.republished_frames,
            "received_messages": self.received_messages,
            "received_frames": self.received_frames,
            "received_bytes": self.received_bytes,
            "reconnects": self.reconnects,
            "pauses": self.pauses,
            "rejected": dict(self.rejected),
            "bytes_out_by_topic": dict(self.bytes_out_by_topic),
        }


@dataclass(frozen=True, slots=True)
class BusOptions:
    """Tuning shared by every bus implementation.

    ``publish_timeout_s + nbytes / min_rate_bytes_s`` is the deadline of one publish, so a
    10 MB model over a slow uplink is not failed by a timeout sized for a 1 kB message.
    """

    #: Largest MQTT payload the bus sends, chunk header included: 1 MiB, so brokers that cap
    #: packets at 2 MB take every frame, and a 1 MB tensor with its codec envelope still
    #: goes as one frame (two would cost a broker round trip and, on a stock Mosquitto, a
    #: delayed-ACK stall: docs/performance.md). Smaller frames cost a round trip each.
    chunk_size: int = 1024 * 1024
    publish_window: int = 16
    publish_timeout_s: float = 10.0
    min_rate_bytes_s: float = 1_000_000.0
    inbox_max_frames: int = 512
    inbox_max_bytes: int = 64 * 2**20
    #: Incomplete chunked transfers, over all senders: the sum of their declared sizes, and
    #: their number. Past these, the transfers that progressed least recently are evicted.
    reassembly_max_bytes: int = 256 * 2**20
    reassembly_max_transfers: int = 64
    reassembly_max_transfer_size: int = 2**30
    reassembly_timeout_s: float = 30.0
    #: Per sender (the publisher a topic names, :func:`~emo_mqtt.topics.publisher_key`):
    #: the sum of the declared sizes of its incomplete transfers, and their number. A new
    #: transfer past either is refused (``chunk_budget``): a device flooding chunk headers
    #: that declare huge sizes costs at most this much memory and locks out only itself.
    #: 64 MiB is several times the largest message of the shipped scenarios (a round of
    #: activations is capped by the 4 MiB device outbox; an overlay-mlp model is 1.5 MB)
    #: and of `emo bench bus --size 10MB`; raise it for larger models.
    reassembly_max_sender_bytes: int = 64 * 2**20
    reassembly_max_sender_transfers: int = 8
    #: ``publish(..., background=True)``: bulk data that must yield to everything else on
    #: the connection (EMO's activations vs FL's updates). It goes in frames of at most
    #: this many bytes (or ``chunk_size``, if smaller) with at most ``background_window``
    #: of them in flight, so a message published meanwhile waits behind two 64 KiB frames,
    #: not behind the whole transfer (an MQTT connection is one FIFO stream: paho sends
    #: frames in the order it got them).
    background_chunk_size: int = 64 * 1024
    background_window: int = 2
    #: How long ``connect()`` waits for the first connection (None: the bus's own connect
    #: timeout). A node whose link starts down in a network scenario waits for it to be up.
    first_connect_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not 64 <= self.chunk_size <= 1024 * 1024:
            # Brokers commonly cap packets at 2 MB (Mosquitto 2.1) or less.
            raise ValueError("chunk_size must be between 64 bytes and 1 MiB (1048576)")
        if self.publish_window < 1 or self.inbox_max_frames < 2:
            raise ValueError("publish_window must be >= 1 and inbox_max_frames >= 2")
        if self.background_chunk_size <= HEADER_SIZE:
            raise ValueError("background_chunk_size must be above the chunk header size")
        if self.background_window < 1:
            raise ValueError("background_window must be >= 1")
        if self.reassembly_max_sender_bytes < 1 or self.reassembly_max_sender_transfers < 1:
            raise ValueError("reassembly_max_sender_bytes and _transfers must be >= 1")


class Bus(ABC):
    """An async publish/subscribe client. Use it as ``async with``; see the module doc."""

    def __init__(self, client_id: str, options: BusOptions | None = None) -> None:
        self.client_id = client_id
        self.options = options or BusOptions()
        self.stats = BusStats()
        self._subscriptions: dict[str, int] = {}
        self._inbox: deque[Message] = deque()
        self._inbox_bytes = 0
        self._inbox_event = asyncio.Event()
        self._paused = False
        self._closed = False
        self._logged_reasons: set[str] = set()
        o = self.options
        self._reassembler = Reassembler(
            max_bytes=o.reassembly_max_bytes,
            max_transfers=o.reassembly_max_transfers,
            max_transfer_size=o.reassembly_max_transfer_size,
            timeout_s=o.reassembly_timeout_s,
            # Under a flood of transfers that never complete, live ones must still get in.
            when_full="evict_stalest",
            max_sender_bytes=o.reassembly_max_sender_bytes,
            max_sender_transfers=o.reassembly_max_sender_transfers,
        )
        self._last_expiry = time.monotonic()
        #: Called after every whole message published, as ``(topic, payload bytes sent
        #: (chunk headers included), qos, retain, started, finished)`` with
        #: ``time.monotonic()`` times: how ``emo run`` writes its message log.
        self.on_published: Callable[[str, int, int, bool, float, float], None] | None = None
        #: Called (from the event loop) each time the bus is connected again after losing its
        #: connection, once its subscriptions are renewed.
        self.on_reconnected: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abstractmethod
    async def connect(self) -> None:
        """Connect (and keep reconnecting until :meth:`close`)."""

    async def close(self) -> None:
        """Disconnect cleanly; pending iterators of :meth:`messages` end."""
        self._closed = True
        self._inbox_event.set()

    @property
    def inbox_size(self) -> int:
        """Whole messages delivered by the broker and not yet taken by :meth:`messages`."""
        return len(self._inbox)

    @property
    def subscriptions(self) -> dict[str, int]:
        """The filters this bus subscribed to itself (filter -> QoS), re-sent on reconnects.

        A persistent session may hold more: the broker keeps a session's subscriptions.
        """
        return dict(self._subscriptions)

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether the bus currently has a live connection."""

    # -- subscriptions ---------------------------------------------------------------------
    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe to a topic filter; it is renewed on every reconnect."""
        validate_filter(topic_filter)
        self._subscriptions[topic_filter] = qos
        await self._subscribe(topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription."""
        self._subscriptions.pop(topic_filter, None)
        await self._unsubscribe(topic_filter)

    @abstractmethod
    async def _subscribe(self, topic_filter: str, qos: int) -> None: ...

    @abstractmethod
    async def _unsubscribe(self, topic_filter: str) -> None: ...

    # -- publishing ------------------------------------------------------------------------
    def publish_deadline(self, nbytes: int) -> float:
        """Seconds allowed for publishing ``nbytes``: grows with the payload size."""
        return self.options.publish_timeout_s + nbytes / self.options.min_rate_bytes_s

    async def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
        background: bool = False,
    ) -> None:
        """Publish ``payload`` to ``topic``; chunked when larger than ``chunk_size``.

        Returns once the broker acknowledged every frame (QoS 1) or the frames were handed to
        the socket (QoS 0). Raises :class:`~emo_mqtt.errors.PublishTimeout` past the deadline
        and :class:`~emo_mqtt.errors.BusError` when the bus is closed. ``background``: bulk
        data that yields to other publishes (see ``BusOptions.background_chunk_size``);
        ignored for a retained message, which cannot be chunked.
        """
        if self._closed:
            raise BusError(f"bus {self.client_id} is closed")
        size = len(payload)
        frame = b""
        chunks: list[bytearray] | None = None
        chunk_size, window = self.options.chunk_size, self.options.publish_window
        if background and not retain:
            chunk_size = min(chunk_size, self.options.background_chunk_size)
            window = self.options.background_window
        if size <= chunk_size:
            frame = payload if isinstance(payload, bytes) else bytes(payload)
        elif retain:
            # A retained message is one message: chunks would overwrite one another.
            raise BusError(
                f"retained payload of {size} bytes on {topic} exceeds chunk_size "
                f"{self.options.chunk_size}"
            )
        else:
            chunks = split(payload, chunk_size=chunk_size - HEADER_SIZE)
        deadline = self.publish_deadline(size) if timeout is None else timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline):
                if chunks is None:
                    await self._publish_frame(topic, frame, qos, retain)
                else:
                    await self._publish_frames(topic, chunks, qos, window)
        except TimeoutError as exc:
            raise PublishTimeout(
                f"publish of {size} bytes to {topic} not acknowledged within {deadline:g} s"
            ) from exc
        nbytes = len(frame) if chunks is None else sum(map(len, chunks))
        self.stats.published_messages += 1
        self.stats.published_frames += 1 if chunks is None else len(chunks)
        self.stats.published_bytes += nbytes
        self.stats.bytes_out_by_topic[topic] += nbytes
        if self.on_published is not None:
            self.on_published(topic, nbytes, qos, retain, started, time.monotonic())

    async def _publish_frames(
        self, topic: str, chunks: list[bytearray], qos: int, in_flight: int
    ) -> None:
        # Keep a window of frames in flight: one at a time would cost a broker round
        # trip per chunk; all at once would hold every chunk in paho's queue.
        window = asyncio.Semaphore(in_flight)

        async def one(chunk: bytearray) -> None:
            async with window:
                await self._publish_chunk(topic, chunk, qos)

        async with asyncio.TaskGroup() as group:
            for chunk in chunks:
                group.create_task(one(chunk))

    async def _publish_chunk(self, topic: str, chunk: bytearray, qos: int) -> None:
        """Publish one chunk frame. :func:`~emo_mqtt.chunking.split` builds them as
        bytearrays; this default hands :meth:`_publish_frame` a bytes copy, and transports
        that take a bytearray as it is (the MQTT bus) override it to save that copy."""
        await self._publish_frame(topic, bytes(chunk), qos, False)

    @abstractmethod
    async def _publish_frame(self, topic: str, frame: bytes, qos: int, retain: bool) -> None:
        """Publish one frame (at most ``chunk_size`` plus a chunk header)."""

    # -- receiving -------------------------------------------------------------------------
    def _deliver(self, message: Message) -> None:
        """Called by implementations for every incoming frame (synchronously).

        A chunk frame goes to the reassembler at once, while its bytes are still in the CPU
        cache from the socket read: its CRC-32 check costs less there than after the frame
        has waited in the inbox (and been evicted to memory). The inbox holds whole
        messages only.
        """
        nbytes = len(message.payload)
        self.stats.received_frames += 1
        self.stats.received_bytes += nbytes
        if is_chunk_frame(message.payload):
            whole = self._reassemble(message)
            if whole is None:
                return
            message = whole
            nbytes = len(whole.payload)
        self._inbox.append(message)
        self._inbox_bytes += nbytes
        self._inbox_event.set()
        o = self.options
        if not self._paused and (
            len(self._inbox) >= o.inbox_max_frames or self._inbox_bytes >= o.inbox_max_bytes
        ):
            self._paused = True
            self.stats.pauses += 1
            self._pause_reading()

    def _reassemble(self, frame: Message) -> Message | None:
        """Feed one chunk frame to the reassembler; return the whole message it completes.

        Refused frames are counted: ``chunk_budget`` when the sender the topic names is
        over its reassembly budget, ``bad_chunk`` for any other bad frame.
        """
        topic = frame.topic
        try:
            whole = self._reassembler.feed(
                topic, frame.payload, time.monotonic(), publisher_key(topic)
            )
        except ChunkError as exc:
            reason = "chunk_budget" if exc.reason in BUDGET_REASONS else "bad_chunk"
            self.reject(reason, topic, str(exc))
            return None
        finally:
            for key, _transfer in self._reassembler.drain_evicted():
                self.reject(
                    "chunk_evicted",
                    key,
                    "an incomplete transfer was evicted to make room (reassembly limits reached)",
                )
        # Retained as its last frame was: receivers tell what the broker kept from before
        # they subscribed (emo_mqtt.incarnation) from what came live.
        return None if whole is None else Message(frame.topic, whole, frame.qos, frame.retain)

    def _pause_reading(self) -> None:  # noqa: B027 (an optional hook)
        """Stop taking frames from the network until :meth:`_resume_reading`."""

    def _resume_reading(self) -> None:  # noqa: B027 (an optional hook)
        """Take frames from the network again."""

    def reject(self, reason: str, topic: str, detail: str = "") -> None:
        """Count (and log once per reason) a message that was refused as bad input."""
        self.stats.rejected[reason] += 1
        if reason not in self._logged_reasons:
            self._logged_reasons.add(reason)
            log.warning(
                "%s: rejected a message on %s (%s): %s; further ones are counted, not logged",
                self.client_id,
                topic,
                reason,
                detail,
            )

    async def _next_frame(self) -> Message | None:
        while not self._inbox:
            if self._closed:
                return None
            self._inbox_event.clear()
            try:
                async with asyncio.timeout(1.0):
                    await self._inbox_event.wait()
            except TimeoutError:
                self._expire_transfers()
        message = self._inbox.popleft()
        self._inbox_bytes -= len(message.payload)
        o = self.options
        if self._paused and (
            len(self._inbox) <= o.inbox_max_frames // 2
            and self._inbox_bytes <= o.inbox_max_bytes // 2
        ):
            self._paused = False
            self._resume_reading()
        return message

    def _expire_transfers(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry < 1.0:
            return
        self._last_expiry = now
        for key, _transfer in self._reassembler.expire(now):
            self.reject("chunk_timeout", key, "an incomplete chunked transfer timed out")

    async def messages(self) -> AsyncIterator[Message]:
        """Yield whole messages from the subscriptions until the bus is closed."""
        while True:
            message = await self._next_frame()
            if message is None:
                return
            self._expire_transfers()
            self.stats.received_messages += 1
            yield message

    @property
    def reassembly_pending_bytes(self) -> int:
        """Bytes declared by incomplete chunked transfers (reserved against the limits)."""
        return self._reassembler.pending_bytes

    @property
    def reassembly_held_bytes(self) -> int:
        """Payload bytes really held by incomplete chunked transfers."""
        return self._reassembler.held_bytes
