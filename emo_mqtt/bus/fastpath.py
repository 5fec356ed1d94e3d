"""Every use of aiomqtt's and paho's private members, in one module, checked on start-up.

The bus moves large tensors faster than a bare aiomqtt client (``emo bench bus``) because
of what this module changes, on the bus's own clients only:

* **paho's copies.** paho copies a publish's payload into a new packet, copies the unsent
  rest again on every partial socket write, and copies a received payload four or five
  times while it parses the packet. :func:`install_paho_paths` replaces, on one paho client
  instance (never the class), the two methods that do so: a large payload is queued as a
  view behind a separately queued header, and a received payload is the packet's own
  bytearray with the header dropped in place.
* **aiomqtt's wake-ups.** aiomqtt spends a task and a ``wait_for`` per publish, and a
  thread-safe wake-up plus two ``epoll_ctl`` calls per outgoing packet; the client class
  built by :func:`fast_client_class` publishes without a task and writes on the loop's
  next pass.
* **Backpressure.** Incoming messages go straight to the bus (aiomqtt's own queue would
  grow without bound or drop), and the socket reader can be removed from the event loop
  so that TCP flow control pushes back to the broker.
* **Delayed ACKs.** After each read the socket is put back in quick-ACK mode (Linux), so
  the kernel acknowledges the broker's data at once. A stock Mosquitto does not set
  ``TCP_NODELAY``: Nagle's algorithm holds its next small packet (a PUBACK, the tail of a
  PUBLISH) until the previous one is acknowledged, and a delayed ACK makes that up to
  40 ms (docs/performance.md).

:data:`MEMBERS` lists every private member used here with the parameters relied upon;
:func:`problems` checks them against the installed releases. ``MqttBus`` uses this module
only when :func:`problems` finds nothing and ``EMO_MQTT_PLAIN`` is not set; otherwise it
falls back to aiomqtt's public API (slower, measured by ``emo bench bus --plain``), and
``tests/test_bus_fastpath.py`` fails on any difference, so an upgrade of either library
cannot change behaviour silently.

This module imports paho only; ``emo_mqtt/bus/mqtt.py`` stays the one module that imports
aiomqtt and hands its ``Client`` class to :func:`fast_client_class`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
import types
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as _PAHO_VERSION
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from emo_mqtt.errors import BusError

log = logging.getLogger("emo_mqtt.bus.mqtt")

#: Private members this module relies on: ``(owner, name, parameters)``. ``parameters`` is
#: the tuple of parameter names of a method (``self`` included), or None for an attribute
#: of an instance. Owners: ``aiomqtt.Client`` and ``paho.Client`` (an instance of each is
#: checked, so attributes set in ``__init__`` count).
MEMBERS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("aiomqtt.Client", "_client", None),
    ("aiomqtt.Client", "_loop", None),
    ("aiomqtt.Client", "_disconnected", None),
    ("aiomqtt.Client", "_pending_publishes", None),
    ("aiomqtt.Client", "_on_message", ("self", "client", "userdata", "message")),
    ("aiomqtt.Client", "_on_socket_open", ("self", "client", "userdata", "sock")),
    ("aiomqtt.Client", "_on_socket_close", ("self", "client", "userdata", "sock")),
    ("aiomqtt.Client", "_on_socket_register_write", ("self", "client", "userdata", "sock")),
    (
        "aiomqtt.Client",
        "_on_publish",
        ("self", "client", "userdata", "mid", "reason_code", "properties"),
    ),
    ("paho.Client", "_sock", None),
    ("paho.Client", "_out_packet", None),
    ("paho.Client", "_in_packet", None),
    ("paho.Client", "_protocol", None),
    ("paho.Client", "_manual_ack", None),
    (
        "paho.Client",
        "_send_publish",
        ("self", "mid", "topic", "payload", "qos", "retain", "dup", "info", "properties"),
    ),
    ("paho.Client", "_handle_publish", ("self",)),
    ("paho.Client", "_packet_queue", ("self", "command", "packet", "mid", "qos", "info")),
    ("paho.Client", "_handle_on_message", ("self", "message")),
    ("paho.Client", "_send_puback", ("self", "mid")),
    ("paho.Client", "_pack_remaining_length", ("self", "packet", "remaining_length")),
    ("paho.Client", "_pack_str16", ("self", "packet", "data")),
    ("paho.Client", "_easy_log", ("self", "level", "fmt", "args")),
)
#: The release lines the members above were read from.
PAHO_LINE = "2."
AIOMQTT_LINE = "2."


def problems(aiomqtt_client: Any, aiomqtt_version: str) -> list[str]:
    """What in the installed aiomqtt/paho differs from :data:`MEMBERS` (empty: nothing).

    ``aiomqtt_client`` is an instance of ``aiomqtt.Client`` (its paho client is
    ``_client``), so attributes set in ``__init__`` are checked too.
    """
    found: list[str] = []
    if not aiomqtt_version.startswith(AIOMQTT_LINE):
        found.append(f"aiomqtt {aiomqtt_version} is not a {AIOMQTT_LINE}x release")
    if not _PAHO_VERSION.startswith(PAHO_LINE):
        found.append(f"paho-mqtt {_PAHO_VERSION} is not a {PAHO_LINE}x release")
    owners = {
        "aiomqtt.Client": aiomqtt_client,
        "paho.Client": getattr(aiomqtt_client, "_client", None),
    }
    for owner, name, params in MEMBERS:
        target = owners[owner]
        if target is None or not hasattr(target, name):
            found.append(f"{owner}.{name} is missing")
            continue
        if params is None:
            continue
        method = getattr(type(target), name, None)
        if not callable(method):
            found.append(f"{owner}.{name} is not a method")
            continue
        got = tuple(inspect.signature(method).parameters)
        if got != params:
            found.append(f"{owner}.{name}{got} differs from the expected {params}")
    return found


class ConnectionLost(Exception):
    """The connection ended before the broker acknowledged a publish."""


class Ack:
    """A publish awaiting its acknowledgement; stands in for aiomqtt's confirmation Event."""

    __slots__ = ("future", "mid")

    def __init__(self, future: asyncio.Future[None], mid: int) -> None:
        self.future = future
        self.mid = mid

    def set(self) -> None:  # called by aiomqtt's on_publish handler
        if not self.future.done():
            self.future.set_result(None)


#: Linux only: re-armed after every read (the kernel leaves quick-ACK mode on its own).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def fast_client_class(base: Any) -> Any:
    """A subclass of ``base`` (``aiomqtt.Client``) with the fast paths of this module.

    Its constructor takes ``deliver(topic, payload, qos, retain)``, called for every
    incoming message, and ``paused()``, whether the bus wants its reader stopped, before
    aiomqtt's own keyword arguments. The link methods (``lost``, ``start``, ``send``,
    ``forget``, ``pause``, ``resume``, ``abandon``) are those ``MqttBus`` expects of a
    connection.
    """

    class FastClient(base):  # type: ignore[misc]
        def __init__(
            self,
            deliver: Callable[[str, bytes | bytearray, int, bool], None],
            paused: Callable[[], bool],
            **kwargs: Any,
        ) -> None:
            self._emo_deliver = deliver
            self._emo_paused = paused
            self._emo_fd = -1
            super().__init__(**kwargs)
            # A chunked publish keeps a window of frames in flight on purpose; aiomqtt
            # warns about more than 10 pending calls.
            self.pending_calls_threshold = 10_000
            install_paho_paths(self._client)
            self._emo_watched: asyncio.Future[None] | None = None

        @property
        def client(self) -> Any:
            return self

        # paho calls this from the event loop thread (aiomqtt drives paho with add_reader).
        def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
            self._emo_deliver(message.topic, message.payload, message.qos, bool(message.retain))

        def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
            super()._on_socket_open(client, userdata, sock)
            self._emo_fd = sock.fileno()
            # paho calls this from aiomqtt's executor thread; queued behind aiomqtt's
            # add_reader, so ours replaces its reader.
            self._loop.call_soon_threadsafe(self._emo_sync_reading)

        def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
            # aiomqtt answers every queued packet (each frame, each PUBACK) with a
            # thread-safe wake-up that registers a writer, one more loop pass for the socket
            # to report writable, and an unregistration: two epoll_ctl calls, a self-pipe
            # write and two passes of latency. On the loop's own thread, write on the next
            # pass instead, and register a writer only if the socket is full.
            try:
                on_loop = asyncio.get_running_loop() is self._loop
            except RuntimeError:
                on_loop = False
            if not on_loop:  # paho queues CONNECT from aiomqtt's executor thread
                super()._on_socket_register_write(client, userdata, sock)
                return
            self._loop.call_soon(self._emo_write, sock)

        def _emo_write(self, sock: Any) -> None:
            client = self._client
            if client._sock is not sock or sock is None:  # that connection is gone
                return
            fd: int = sock.fileno()
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)
                return
            # Bytes left means the socket is full (paho stays "registered" meanwhile); none
            # left, paho has unregistered through aiomqtt. A write error closed the socket.
            if client.want_write() and client._sock is sock:
                self._loop.add_writer(fd, self._emo_write, sock)

        def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
            super()._on_socket_close(client, userdata, sock)
            self._emo_fd = -1

        def _emo_sync_reading(self) -> None:
            if self._emo_paused():
                self.pause()
            else:
                self.resume()

        def _emo_read(self) -> None:
            # aiomqtt's reader callback, plus quick-ACK mode re-armed (see the module doc).
            client = self._client
            try:
                while True:
                    client.loop_read()
                    sock = client._sock
                    if sock is None:
                        break
                    if _QUICKACK is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                    pending = getattr(sock, "pending", None)
                    if pending is None or pending() <= 0:
                        break
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        # -- the link API MqttBus uses ---------------------------------------------------
        @property
        def lost(self) -> asyncio.Future[None]:
            """Resolves when this connection ends, for any reason."""
            fut: asyncio.Future[None] = self._disconnected
            return fut

        def start(self) -> None:
            """Nothing to start: messages arrive through ``_on_message``."""

        def pause(self) -> None:
            if self._emo_fd >= 0:
                self._loop.remove_reader(self._emo_fd)

        def resume(self) -> None:
            if self._emo_fd >= 0 and not self._disconnected.done():
                self._loop.add_reader(self._emo_fd, self._emo_read)
                # TLS may hold decrypted bytes that will never make the fd readable again.
                self._loop.call_soon(self._emo_read)

        def abandon(self) -> None:
            """Close the socket of an attempt that failed before its CONNACK."""
            with contextlib.suppress(Exception):
                self._client.disconnect()

        def send(self, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> Ack:
            """Hand a frame to paho; the ack's future resolves when it is acknowledged.

            The future fails with :class:`ConnectionLost` when the connection ends first
            (QoS 0: resolves once sent). Raises :class:`~emo_mqtt.errors.BusError` when
            paho refuses the publish.
            """
            future: asyncio.Future[None] = self._loop.create_future()
            lost = self._disconnected
            if lost.done():
                future.set_exception(ConnectionLost())
                return Ack(future, -1)
            info = self._client.publish(topic, payload, qos, retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise BusError(f"could not publish to {topic}: {paho.error_string(info.rc)}")
            ack = Ack(future, info.mid)
            if info.is_published():
                future.set_result(None)
                return ack
            self._pending_publishes[info.mid] = ack
            if self._emo_watched is not lost:
                self._emo_watched = lost
                lost.add_done_callback(self._emo_fail_acks)
            return ack

        def forget(self, ack: Ack) -> None:
            """Stop tracking an ack nobody waits for any more (its publish timed out)."""
            if self._pending_publishes.get(ack.mid) is ack:
                del self._pending_publishes[ack.mid]

        def _emo_fail_acks(self, _lost: asyncio.Future[None]) -> None:
            for ack in list(self._pending_publishes.values()):
                if isinstance(ack, Ack) and not ack.future.done():
                    ack.future.set_exception(ConnectionLost())

    return FastClient


# ------------------------------------------------------------------ paho's copies

#: Payloads below this are copied into paho's packet as usual: one small copy costs less
#: than the extra socket write of a separately queued header.
ZERO_COPY_MIN = 64 * 1024
_U16 = struct.Struct("!H")
_PUBLISH = 0x30


def install_paho_paths(client: Any) -> None:
    """Give one paho client the zero-copy publish and receive paths."""
    client._send_publish = types.MethodType(_send_publish, client)
    client._handle_publish = types.MethodType(_handle_publish, client)


def _send_publish(
    self: Any,
    mid: int,
    topic: bytes,
    payload: bytes | bytearray = b"",
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    info: Any = None,
    properties: Any = None,
) -> Any:
    """paho's ``_send_publish`` without copying a large payload (also used for re-sends)."""
    if len(payload) < ZERO_COPY_MIN or self._sock is None:
        return paho.Client._send_publish(
            self, mid, topic, payload, qos, retain, dup, info, properties
        )
    head = bytearray(((_PUBLISH | (dup & 1) << 3 | qos << 1 | retain),))
    props = b""
    if self._protocol == paho.MQTTv5:
        props = b"\x00" if properties is None else properties.pack()
    size = 2 + len(topic) + (2 if qos else 0) + len(props) + len(payload)
    self._pack_remaining_length(head, size)
    self._pack_str16(head, topic)
    if qos:
        head += _U16.pack(mid)
    head += props
    self._easy_log(
        paho.MQTT_LOG_DEBUG,
        "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', ... (%d bytes)",
        dup,
        qos,
        retain,
        mid,
        topic,
        len(payload),
    )
    # The header goes first as a packet of its own: command 0 makes paho's writer do
    # nothing when it is sent. The payload follows as a view, so neither queueing it nor
    # re-slicing its unsent rest after a partial write copies it.
    self._out_packet.append(
        {
            "command": 0,
            "mid": 0,
            "qos": 0,
            "pos": 0,
            "to_process": len(head),
            "packet": head,
            "info": None,
        }
    )
    return self._packet_queue(_PUBLISH, memoryview(payload), mid, qos, info)


def _handle_publish(self: Any) -> Any:
    """paho's ``_handle_publish`` (QoS 0 and 1) without copying the payload."""
    packet = self._in_packet["packet"]
    command = self._in_packet["command"]
    qos = (command & 0x06) >> 1
    if qos == 2 or type(packet) is not bytearray:
        return paho.Client._handle_publish(self)
    try:
        (length,) = _U16.unpack_from(packet, 0)
        pos = 2 + length
        topic = bytes(packet[2:pos])
        mid = 0
        if qos:
            (mid,) = _U16.unpack_from(packet, pos)
            pos += 2
        properties = None
        if self._protocol == paho.MQTTv5:
            size, width = _varint(packet, pos)
            if size:  # else None: an empty Properties costs ~10 us and nothing here reads it
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.unpack(bytes(packet[pos : pos + width + size]))  # type: ignore[no-untyped-call]
            pos += width + size
    except (struct.error, IndexError, ValueError) as exc:
        raise MalformedPacket(f"malformed PUBLISH: {exc}") from exc
    if pos > len(packet) or (length == 0 and self._protocol != paho.MQTTv5):
        raise MalformedPacket("malformed PUBLISH header")
    try:
        del packet[:pos]  # O(1): a bytearray drops leading bytes by moving its start
    except BufferError:  # someone holds a view of it: fall back to one copy
        packet = packet[pos:]
    message = paho.MQTTMessage(mid=mid, topic=topic)
    message.dup = bool(command & 0x08)
    message.qos = qos
    message.retain = bool(command & 0x01)
    message.properties = properties
    message.payload = packet
    message.timestamp = paho.time_func()
    self._easy_log(
        paho.MQTT_LOG_DEBUG,
        "Received PUBLISH (d%d, q%d, r%d, m%d), %r, ...  (%d bytes)",
        message.dup,
        qos,
        message.retain,
        mid,
        topic,
        len(packet),
    )
    self._handle_on_message(message)
    if qos == 1 and not self._manual_ack:
        return self._send_puback(mid)
    return paho.MQTT_ERR_SUCCESS


def _varint(data: bytearray, pos: int) -> tuple[int, int]:
    """Decode an MQTT variable byte integer at ``pos``: (value, bytes used)."""
    value = 0
    for i in range(4):
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    raise ValueError("variable byte integer longer than 4 bytes")


def paho_socket(aiomqtt_client: Any) -> socket.socket | None:
    """The TCP socket under an ``aiomqtt.Client`` (``None`` when not connected).

    aiomqtt exposes no socket; its paho client (``_client``, in :data:`MEMBERS`) does, through
    paho's public ``socket()``. Used to cut a connection as a crash would
    (:meth:`emo_mqtt.bus.mqtt.MqttBus.sever`).
    """
    paho_client = getattr(aiomqtt_client, "_client", None)
    sock = None if paho_client is None else paho_client.socket()
    return sock if isinstance(sock, socket.socket) else None


def pending_acks(aiomqtt_client: Any) -> int:
    """QoS 1/2 publishes of an ``aiomqtt.Client`` still waiting for their acknowledgement."""
    return len(getattr(aiomqtt_client, "_pending_publishes", {}))
