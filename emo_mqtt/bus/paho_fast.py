"""Zero-copy publish and receive paths for paho's client, installed on the bus's own clients.

paho copies a publish's payload into a new packet, copies the unsent rest again on every
partial socket write, and copies a received payload four or five times while it parses the
packet (``struct.unpack`` into strings, then slices). :func:`install_fast_paths` replaces,
on one paho client instance (never the class), the two methods that do so: a large payload
is queued as a view behind a separately queued header, and a received payload is the
packet's own bytearray with the header dropped in place. When paho's internals do not look
as expected (see :data:`_PAHO_PRIVATES`), nothing is installed and paho's own paths stay.

This module imports paho only; ``emo_mqtt/bus/mqtt.py`` stays the one module that talks to
aiomqtt.
"""

from __future__ import annotations

import logging
import struct
import types
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as _PAHO_VERSION
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("emo_mqtt.bus.mqtt")

# What the two replacement methods below rely on; without any of it they stay uninstalled.
_PAHO_PRIVATES = (
    "_send_publish",
    "_handle_publish",
    "_packet_queue",
    "_out_packet",
    "_in_packet",
    "_handle_on_message",
    "_send_puback",
    "_pack_remaining_length",
    "_pack_str16",
    "_easy_log",
    "_protocol",
    "_manual_ack",
    "_sock",
)
#: Payloads below this are copied into paho's packet as usual: one small copy costs less
#: than the extra socket write of a separately queued header.
ZERO_COPY_MIN = 64 * 1024
_U16 = struct.Struct("!H")
_PUBLISH = 0x30


def install_fast_paths(client: Any) -> bool:
    """Give one paho client the zero-copy publish and receive paths; return whether it did."""
    if not _PAHO_VERSION.startswith("2.") or not all(hasattr(client, n) for n in _PAHO_PRIVATES):
        log.warning(
            "paho-mqtt %s: internals differ, bus stays on paho's copying paths", _PAHO_VERSION
        )
        return False
    client._send_publish = types.MethodType(_send_publish, client)
    client._handle_publish = types.MethodType(_handle_publish, client)
    return True


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
        paho.MQTT_LOG_DEBUG, "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', ... (%d bytes)",
        dup, qos, retain, mid, topic, len(payload),
    )
    # The header goes first as a packet of its own: command 0 makes paho's writer do
    # nothing when it is sent. The payload follows as a view, so neither queueing it nor
    # re-slicing its unsent rest after a partial write copies it.
    self._out_packet.append(
        {"command": 0, "mid": 0, "qos": 0, "pos": 0, "to_process": len(head),
         "packet": head, "info": None}
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
        paho.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), %r, ...  (%d bytes)",
        message.dup, qos, message.retain, mid, topic, len(packet),
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
