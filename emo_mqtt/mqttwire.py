"""Count the bytes of an MQTT byte stream by packet type and by PUBLISH topic.

A bridge between two brokers is one TCP connection; a relay in its path sees a stream of
MQTT packets in each direction. :class:`WireMeter` is fed that stream in arbitrary pieces
(as the relay reads them) and counts every packet's full size on the wire (fixed header,
variable header, payload), and for PUBLISH packets also by the topic's
:class:`~emo_mqtt.topics.Kind`: what crossed is *counted*, not estimated.

Only the fixed header and, for PUBLISH, the topic name are parsed; both have the same layout
in MQTT 3.1.1 and 5, so the meter works with either protocol version. Malformed input (a
remaining length over four bytes) makes the meter stop classifying and count the rest as
``unparsed``: it never raises, and the relay keeps relaying.

This module is pure: no I/O, no asyncio.
"""

from __future__ import annotations

from collections import Counter

from emo_mqtt.errors import TopicError
from emo_mqtt.topics import parse

__all__ = ["PUBLISH", "WireMeter"]

PUBLISH = 3
#: Only the first bytes of a PUBLISH are kept to read its topic: 2 length bytes + topic.
_MAX_HEAD = 2 + 65535


class WireMeter:
    """Bytes of one direction of an MQTT connection, by packet and by topic kind.

    ``total``: every byte fed; ``publish_bytes``: bytes of PUBLISH packets;
    ``by_kind``: PUBLISH bytes by topic kind (``Kind`` value, or ``other`` for a topic
    outside the emo grammar, e.g. ``$SYS``); ``packets``: packets by type number;
    ``unparsed``: bytes fed after the stream stopped making sense.
    """

    def __init__(self) -> None:
        self.total = 0
        self.publish_bytes = 0
        self.unparsed = 0
        self.by_kind: Counter[str] = Counter()
        self.packets: Counter[int] = Counter()
        self._header = bytearray()  # fixed header being read
        self._left = 0  # bytes of the current packet's body still to come
        self._size = 0  # full size of the current packet
        self._type = 0
        self._head = bytearray()  # start of a PUBLISH body, until its topic is known
        self._head_want = 0
        self._broken = False

    def feed(self, data: bytes) -> None:
        """Account for ``data``, the next bytes of the stream."""
        self.total += len(data)
        if self._broken:
            self.unparsed += len(data)
            return
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self._left == 0:
                i = self._read_header(view, i)
                if self._broken:
                    self.unparsed += len(view) - i
                    return
                continue
            take = min(self._left, len(view) - i)
            if self._type == PUBLISH and self._head_want:
                # Collect the topic (its length first) before skipping the rest.
                take = min(self._head_want - len(self._head), take)
                self._head += view[i : i + take]
                self._classify()
            self._left -= take
            i += take
            if self._left == 0:
                self._finish()

    def _read_header(self, view: memoryview, i: int) -> int:
        """Read fixed-header bytes from ``view[i:]``; the index after what was used."""
        while i < len(view):
            self._header.append(view[i])
            i += 1
            if len(self._header) == 1:
                continue
            if self._header[-1] & 0x80:
                if len(self._header) > 4:  # four length bytes at most (MQTT 2.2.3)
                    self._broken = True
                    return i
                continue
            # The remaining length is complete.
            length = 0
            for n, byte in enumerate(self._header[1:]):
                length |= (byte & 0x7F) << (7 * n)
            self._type = self._header[0] >> 4
            self._size = len(self._header) + length
            self._left = length
            self._header.clear()
            self._head.clear()
            self._head_want = 2 if self._type == PUBLISH else 0
            if length == 0:
                self._finish()
            return i
        return i

    def _classify(self) -> None:
        """Once a PUBLISH's topic length (then its topic) has arrived, note its kind."""
        if self._head_want == 2 and len(self._head) >= 2:
            want = 2 + int.from_bytes(self._head[:2], "big")
            self._head_want = min(want, _MAX_HEAD)
        if self._head_want > 2 and len(self._head) >= self._head_want:
            self._head_want = 0  # topic known: the rest of the body is skipped

    def _finish(self) -> None:
        """The current packet is complete: count it."""
        self.packets[self._type] += 1
        if self._type == PUBLISH:
            self.publish_bytes += self._size
            self.by_kind[self._kind()] += self._size
        self._size = 0
        self._head_want = 0

    def _kind(self) -> str:
        raw = bytes(self._head[2:])
        try:
            return parse(raw.decode("utf-8")).kind.value
        except (UnicodeDecodeError, TopicError):
            return "other"

    def snapshot(self) -> dict[str, object]:
        """The counters as plain data (JSON-ready)."""
        return {
            "bytes": self.total,
            "publish_bytes": self.publish_bytes,
            "by_kind": dict(sorted(self.by_kind.items())),
            "unparsed": self.unparsed,
        }
