"""Pure chunk splitter and reassembler for payloads too large for one MQTT packet.

A chunk frame is::

    CHUNK_MAGIC | u8 version | 16-byte transfer id | u64 total_size | u64 offset
    | u32 crc32(data) | data

all little-endian; the chunk's length is implied by the frame's length. Chunks of one
transfer travel on the topic the whole message would have used and may arrive in any
order, duplicated, or re-sent wholesale after a reconnect. :class:`Reassembler` puts them
back together under hard memory limits: a transfer's memory is reserved once, on its first
frame, and only if the limits allow it; a transfer that does not fit is refused (or, by
choice, makes room by evicting the transfers that progressed least recently).

Copies are what a large transfer costs, so neither side makes one it can avoid:
:func:`split` builds each frame with a single join of header and payload slice (and
checksums that fresh copy, while it is in the CPU cache), and the
:class:`Reassembler` keeps the chunks of an in-order transfer (the normal case on one MQTT
connection) as views of the received frames and joins them once, at completion, into the
payload; only an out-of-order or overlapping arrival falls back to a buffer written in place.

The module is pure: no I/O, no clocks (callers pass ``now``), no asyncio.
"""

from __future__ import annotations

import secrets
import struct
import zlib
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from emo_mqtt.errors import ChunkError

__all__ = [
    "CHUNK_MAGIC",
    "CHUNK_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "ChunkHeader",
    "Reassembler",
    "ReassemblerStats",
    "is_chunk_frame",
    "parse_frame",
    "split",
]

CHUNK_MAGIC = b"EMC"
CHUNK_VERSION = 1
#: Must stay <= 1 MB so that brokers capping packets at 2 MB accept every chunk.
DEFAULT_CHUNK_SIZE = 512 * 1024
TRANSFER_ID_SIZE = 16

_HEAD = struct.Struct("<3sB16sQQI")
HEADER_SIZE = _HEAD.size  # 40 bytes
_BLANK_HEAD = bytes(HEADER_SIZE)
_JOIN = bytearray().join  # joins into a new bytearray, without zero-filling it first
#: Completed transfer ids remembered per Reassembler, to recognise late duplicates.
COMPLETED_MEMORY = 1024


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The parsed header of one chunk frame; ``length`` is the chunk's data length."""

    transfer_id: bytes
    total_size: int
    offset: int
    length: int
    crc32: int


def is_chunk_frame(data: bytes | bytearray | memoryview) -> bool:
    """Cheap check that ``data`` starts like a chunk frame (magic only; any version)."""
    return len(data) >= len(CHUNK_MAGIC) + 1 and bytes(data[: len(CHUNK_MAGIC)]) == CHUNK_MAGIC


def split(
    payload: bytes | bytearray | memoryview,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer_id: bytes | None = None,
) -> list[bytearray]:
    """Split ``payload`` into chunk frames of at most ``chunk_size`` data bytes each.

    The payload is cut into the fewest chunks that fit, of (almost) equal sizes, rather
    than full chunks and a short tail: a tiny last frame would cost a whole broker round
    trip for a few bytes. A random 16-byte transfer id is drawn unless one is given. An
    empty payload yields one frame. Each frame is a bytearray built with a single join, so
    the payload is copied exactly once, and its header is filled in after the copy.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ChunkError(f"chunk_size must be a positive int, got {chunk_size!r}")
    tid = secrets.token_bytes(TRANSFER_ID_SIZE) if transfer_id is None else transfer_id
    if not isinstance(tid, bytes) or len(tid) != TRANSFER_ID_SIZE:
        raise ChunkError(f"transfer_id must be {TRANSFER_ID_SIZE} bytes, got {tid!r}")
    view = memoryview(payload).cast("B")
    total = len(view)
    count = max(1, -(-total // chunk_size))
    step = -(-total // count) if total else 1  # <= chunk_size
    frames = []
    for offset in range(0, max(total, 1), step):
        frame = _JOIN((_BLANK_HEAD, view[offset : offset + step]))
        # Checksum the copy just written, still in cache, and fill the header in after:
        # CRC-32 runs about twice as fast on cached bytes as on a payload fresh from RAM.
        with memoryview(frame) as written:
            crc = zlib.crc32(written[HEADER_SIZE:])
        _HEAD.pack_into(frame, 0, CHUNK_MAGIC, CHUNK_VERSION, tid, total, offset, crc)
        frames.append(frame)
    return frames


def _parse_unchecked(frame: bytes | bytearray | memoryview) -> tuple[ChunkHeader, memoryview]:
    """Parse a frame's header and validate its structure, but not its checksum."""
    try:
        view = memoryview(frame).cast("B")
    except TypeError as exc:
        raise ChunkError(f"not a bytes-like chunk frame: {type(frame).__name__}") from exc
    if len(view) < HEADER_SIZE:
        raise ChunkError(f"chunk frame truncated: {len(view)} bytes < {HEADER_SIZE}-byte header")
    magic, version, tid, total, offset, crc = _HEAD.unpack_from(view)
    if magic != CHUNK_MAGIC:
        raise ChunkError(f"not a chunk frame: bad magic {magic!r}")
    if version != CHUNK_VERSION:
        raise ChunkError(f"unsupported chunk version {version}; this build supports [1]")
    data = view[HEADER_SIZE:]
    length = len(data)
    if offset + length > total:
        raise ChunkError(f"chunk [{offset}, {offset + length}) overruns total size {total}")
    if length == 0 and total != 0:
        # split() never produces one; it would pin a buffer without making progress.
        raise ChunkError("empty chunk in a non-empty transfer")
    return ChunkHeader(tid, total, offset, length, crc), data


def parse_frame(frame: bytes | bytearray | memoryview) -> tuple[ChunkHeader, memoryview]:
    """Parse and verify one chunk frame; return its header and a view of its data.

    Raises :class:`ChunkError` for a truncated frame, bad magic or version, a range
    outside the transfer, or a checksum mismatch.
    """
    header, data = _parse_unchecked(frame)
    _verify(header, data)
    return header, data


def _verify(header: ChunkHeader, data: memoryview) -> None:
    if zlib.crc32(data) != header.crc32:
        raise ChunkError(
            f"chunk checksum mismatch at offset {header.offset} of transfer "
            f"{header.transfer_id.hex()}"
        )


@dataclass(slots=True)
class ReassemblerStats:
    """Counters; ``rejected`` maps a reason (e.g. ``"checksum"``) to its count."""

    completed: int = 0
    duplicates: int = 0
    expired: int = 0
    evicted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class _Transfer:
    """One transfer in progress: what was received so far, and where it belongs.

    While chunks arrive in order, each one's data is kept as a view of its frame
    (``pieces``) and the payload is joined once, at completion: no zero-filled buffer, and
    one copy of every byte. The first chunk that is not the next in line (out of order, a
    duplicate, an overlap) moves what came so far into ``buffer``, a bytearray of the
    whole transfer that later chunks are written into at their offsets.
    """

    __slots__ = ("buffer", "covered", "ends", "last_progress", "pieces", "starts", "total")

    def __init__(self, total: int, now: float) -> None:
        self.total = total
        self.pieces: list[memoryview] | None = []
        self.buffer: bytearray | None = None
        # Sorted, disjoint, non-adjacent [start, end) ranges; adjacent ones are merged, so
        # an in-order transfer keeps exactly one range. Kept in buffer mode only: in
        # pieces mode the one range is [0, covered).
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0
        self.last_progress = now

    def to_buffer(self) -> bytearray:
        """Leave pieces mode: copy what came so far into a buffer of the whole transfer."""
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = bytearray(self.total)
            offset = 0
            for piece in self.pieces or ():
                buffer[offset : offset + len(piece)] = piece
                offset += len(piece)
            if self.covered:
                self.starts, self.ends = [0], [self.covered]
            self.pieces = None
        return buffer


class Reassembler:
    """Reassemble chunked transfers, keyed by (topic, transfer id), under hard limits.

    ``max_bytes`` bounds the sum of in-progress buffers, ``max_transfers`` their number and
    ``max_transfer_size`` any one transfer. A first frame that would break the count or
    byte limit is refused with :class:`ChunkError` (``when_full="refuse"``), or makes room by
    evicting the transfers that progressed least recently (``when_full="evict_stalest"``):
    a flood of transfers that never complete then cannot lock out live ones, which
    progress all the time. Evictions are counted and reported by :meth:`drain_evicted`.
    Not thread-safe: use one per event loop / thread. Call :meth:`expire` periodically.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 256 * 2**20,
        max_transfers: int = 64,
        max_transfer_size: int = 1 * 2**30,
        timeout_s: float = 30.0,
        when_full: Literal["refuse", "evict_stalest"] = "refuse",
    ) -> None:
        if min(max_bytes, max_transfers, max_transfer_size) < 0 or not timeout_s > 0:
            raise ChunkError("Reassembler limits must be non-negative and timeout_s positive")
        if when_full not in ("refuse", "evict_stalest"):
            raise ChunkError(f"when_full must be 'refuse' or 'evict_stalest', not {when_full!r}")
        self.when_full = when_full
        self._evicted: list[tuple[str, bytes]] = []
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self.max_transfer_size = max_transfer_size
        self.timeout_s = timeout_s
        self.stats = ReassemblerStats()
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}
        self._completed: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._pending = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held by buffers of transfers in progress (never above ``max_bytes``)."""
        return self._pending

    @property
    def pending_transfers(self) -> int:
        """Number of transfers in progress."""
        return len(self._transfers)

    def _reject(self, reason: str, message: str) -> ChunkError:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        return ChunkError(message)

    def feed(
        self, key: str, frame: bytes | bytearray | memoryview, now: float
    ) -> bytes | bytearray | None:
        """Take one chunk frame received on topic ``key`` at time ``now``.

        Returns the whole payload when this frame completes its transfer, else None: a new
        ``bytes`` when the chunks came in order, else the transfer's own ``bytearray``; the
        Reassembler keeps no reference to it. Until then it may keep a view of ``frame``
        rather than a copy: a caller must not modify a frame after feeding it. Duplicates,
        including late ones for a transfer completed recently, are counted in
        ``stats.duplicates`` and return None.
        """
        try:
            header, data = _parse_unchecked(frame)
        except ChunkError as exc:
            raise self._reject("malformed", str(exc)) from exc
        try:
            _verify(header, data)
        except ChunkError as exc:
            raise self._reject("checksum", str(exc)) from exc
        tkey = (key, header.transfer_id)
        transfer = self._transfers.get(tkey)
        if transfer is None:
            if tkey in self._completed:
                self._completed.move_to_end(tkey)
                self.stats.duplicates += 1
                return None
            if header.total_size == 0:
                self._finish(tkey)
                return b""
            transfer = self._start(tkey, header.total_size, now)
        elif header.total_size != transfer.total:
            raise self._reject(
                "inconsistent",
                f"chunk declares total size {header.total_size}, transfer "
                f"{header.transfer_id.hex()} on {key!r} has {transfer.total}",
            )
        pieces = transfer.pieces
        if (
            pieces is not None
            and header.offset == transfer.covered
            # Each piece pins a frame and a view object: a transfer sent in tiny chunks
            # moves to a buffer, so bookkeeping stays a small fraction of its size.
            and len(pieces) < max(64, transfer.total >> 14)
        ):
            pieces.append(data)  # the next chunk in line: nothing to compare, no copy yet
            transfer.covered += header.length
        elif not self._store(transfer, header, data):
            self.stats.duplicates += 1
            return None
        transfer.last_progress = now
        if transfer.covered < transfer.total:
            return None
        del self._transfers[tkey]
        self._pending -= transfer.total
        self._finish(tkey)
        if transfer.buffer is not None:
            return transfer.buffer
        # The one copy of an in-order transfer; bytes.join does not zero-fill first.
        return b"".join(pieces or ())

    def _start(self, tkey: tuple[str, bytes], total: int, now: float) -> _Transfer:
        # Every check happens before bytearray(total): a refused transfer costs nothing.
        if total > self.max_transfer_size:
            raise self._reject(
                "too_large", f"transfer of {total} bytes exceeds {self.max_transfer_size}"
            )
        if self.when_full == "evict_stalest" and total <= self.max_bytes:
            self._make_room(total)
        if len(self._transfers) >= self.max_transfers:
            raise self._reject(
                "max_transfers", f"{len(self._transfers)} transfers already in progress"
            )
        if self._pending + total > self.max_bytes:
            raise self._reject(
                "max_bytes",
                f"transfer of {total} bytes would exceed max_bytes ({self._pending} pending "
                f"of {self.max_bytes})",
            )
        transfer = _Transfer(total, now)
        self._transfers[tkey] = transfer
        self._pending += total
        return transfer

    def _make_room(self, total: int) -> None:
        """Evict least-recently-progressed transfers until one more of ``total`` bytes fits."""
        while self._transfers and (
            len(self._transfers) >= self.max_transfers or self._pending + total > self.max_bytes
        ):
            tkey = min(self._transfers, key=lambda k: self._transfers[k].last_progress)
            self._pending -= self._transfers.pop(tkey).total
            self.stats.evicted += 1
            self._evicted.append(tkey)

    def drain_evicted(self) -> list[tuple[str, bytes]]:
        """(key, transfer id) of the transfers evicted since the last call."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _store(self, t: _Transfer, header: ChunkHeader, data: memoryview) -> bool:
        """Write the new parts of a chunk; return whether any byte was new."""
        buffer = t.to_buffer()
        start, end = header.offset, header.offset + header.length
        # Ranges lo..hi-1 overlap or touch [start, end).
        lo = bisect_left(t.ends, start)
        hi = bisect_right(t.starts, end)
        gaps: list[tuple[int, int]] = []
        cursor = start
        for i in range(lo, hi):
            a, b = max(t.starts[i], start), min(t.ends[i], end)
            # A bytearray slice + memcmp is ~20x faster than comparing memoryviews.
            if a < b and buffer[a:b] != data[a - start : b - start]:
                raise self._reject(
                    "conflict",
                    f"chunk [{start}, {end}) of transfer {header.transfer_id.hex()} "
                    f"disagrees with bytes already received",
                )
            if a > cursor:
                gaps.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < end:
            gaps.append((cursor, end))
        if not gaps:
            return False
        # Bookkeeping stays under ~2% of the buffer, however fragmented the arrival order:
        # a peer sending tiny scattered chunks cannot grow it past that.
        if hi - lo == 0 and len(t.starts) >= max(1024, t.total // 4096):
            raise self._reject("fragmented", "transfer arrives in too many disjoint pieces")
        for a, b in gaps:
            buffer[a:b] = data[a - start : b - start]
            t.covered += b - a
        new_start = min(start, t.starts[lo]) if hi > lo else start
        new_end = max(end, t.ends[hi - 1]) if hi > lo else end
        t.starts[lo:hi] = [new_start]
        t.ends[lo:hi] = [new_end]
        return True

    def _finish(self, tkey: tuple[str, bytes]) -> None:
        self.stats.completed += 1
        self._completed[tkey] = None
        if len(self._completed) > COMPLETED_MEMORY:
            self._completed.popitem(last=False)

    def expire(self, now: float) -> list[tuple[str, bytes]]:
        """Drop transfers with no new bytes for ``timeout_s``; return their (key, id)."""
        dropped = [k for k, t in self._transfers.items() if now - t.last_progress >= self.timeout_s]
        for tkey in dropped:
            self._pending -= self._transfers.pop(tkey).total
        self.stats.expired += len(dropped)
        return dropped
