"""An in-process broker and bus with the same interface as the MQTT bus, for fast tests.

:class:`MemoryBroker` behaves like a small MQTT broker: topic filters with ``+``/``#``,
retained messages, persistent sessions (subscriptions and queued messages survive a
disconnect unless ``clean_start``), last wills on an abnormal disconnect, and a bounded
per-client queue whose overflow is counted (as Mosquitto's ``max_queued_messages``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from emo_mqtt.bus.base import Bus, BusOptions, Message
from emo_mqtt.errors import BusError
from emo_mqtt.topics import matches


@dataclass
class _Session:
    subscriptions: dict[str, int] = field(default_factory=dict)
    backlog: deque[Message] = field(default_factory=deque)
    client: MemoryBus | None = None


class MemoryBroker:
    """The shared state of every :class:`MemoryBus` connected to it."""

    def __init__(self, max_queued_messages: int = 100_000) -> None:
        self.max_queued_messages = max_queued_messages
        self.retained: dict[str, Message] = {}
        self.sessions: dict[str, _Session] = {}
        self.dropped = 0
        self.wills: dict[str, Message] = {}

    def attach(self, bus: MemoryBus, clean_start: bool) -> None:
        session = self.sessions.get(bus.client_id)
        if session is not None and session.client is not None:
            # MQTT: a second connection with the same client id takes over the first.
            session.client.abort(publish_will=False)
        if session is None or clean_start:
            session = _Session()
            self.sessions[bus.client_id] = session
        session.client = bus
        self._flush(session)

    def detach(self, bus: MemoryBus, publish_will: bool) -> None:
        session = self.sessions.get(bus.client_id)
        if session is not None and session.client is bus:
            session.client = None
        will = self.wills.pop(bus.client_id, None)
        if publish_will and will is not None:
            self.route(will)

    def subscribe(self, client_id: str, topic_filter: str, qos: int) -> None:
        session = self.sessions[client_id]
        session.subscriptions[topic_filter] = qos
        for message in self.retained.values():
            if matches(topic_filter, message.topic):
                self._enqueue(session, message)

    def unsubscribe(self, client_id: str, topic_filter: str) -> None:
        self.sessions[client_id].subscriptions.pop(topic_filter, None)

    def route(self, message: Message) -> None:
        if message.retain:
            if message.payload:
                self.retained[message.topic] = message
            else:
                # MQTT: an empty retained payload clears the retained message.
                self.retained.pop(message.topic, None)
        delivered = Message(message.topic, message.payload, message.qos, False)
        for session in self.sessions.values():
            if any(matches(f, message.topic) for f in session.subscriptions):
                self._enqueue(session, delivered)

    def _enqueue(self, session: _Session, message: Message) -> None:
        if len(session.backlog) >= self.max_queued_messages:
            self.dropped += 1
            return
        session.backlog.append(message)
        self._flush(session)

    def _flush(self, session: _Session) -> None:
        client = session.client
        while session.backlog and client is not None and not client.reading_paused:
            client._deliver(session.backlog.popleft())

    def resume(self, bus: MemoryBus) -> None:
        session = self.sessions.get(bus.client_id)
        if session is not None and session.client is bus:
            self._flush(session)


class MemoryBus(Bus):
    """A :class:`Bus` on a :class:`MemoryBroker`; no sockets, same semantics."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: Message | None = None,
        clean_start: bool = False,
        options: BusOptions | None = None,
    ) -> None:
        super().__init__(client_id, options)
        self.broker = broker
        self.will = will
        self.clean_start = clean_start
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def reading_paused(self) -> bool:
        return self._paused

    async def connect(self) -> None:
        if self._connected:
            return
        self._closed = False
        self._connected = True
        if self.will is not None:
            self.broker.wills[self.client_id] = self.will
        self.broker.attach(self, self.clean_start)
        for topic_filter, qos in self._subscriptions.items():
            self.broker.subscribe(self.client_id, topic_filter, qos)

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            self.broker.detach(self, publish_will=False)
        await super().close()

    def abort(self, publish_will: bool = True) -> None:
        """Drop the connection as a crash would: the broker publishes the last will."""
        if self._connected:
            self._connected = False
            self.broker.detach(self, publish_will=publish_will)
        self._closed = True
        self._inbox_event.set()

    def _require_connection(self) -> None:
        if not self._connected:
            raise BusError(f"memory bus {self.client_id} is not connected")

    async def _subscribe(self, topic_filter: str, qos: int) -> None:
        self._require_connection()
        self.broker.subscribe(self.client_id, topic_filter, qos)

    async def _unsubscribe(self, topic_filter: str) -> None:
        self._require_connection()
        self.broker.unsubscribe(self.client_id, topic_filter)

    async def _publish_frame(self, topic: str, frame: bytes, qos: int, retain: bool) -> None:
        self._require_connection()
        self.broker.route(Message(topic, frame, qos, retain))

    def _resume_reading(self) -> None:
        self.broker.resume(self)
