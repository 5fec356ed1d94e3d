"""Pure chunk splitter and reassembler for payloads too large for one MQTT packet.

A chunk frame is::

    CHUNK_MAGIC | u8 version | 16-byte transfer id | u64 total_size | u64 offset
    | u32 crc32(data) | data

all little-endian; the chunk's length is implied by the frame's length. Chunks of one
transfer travel on the topic the whole message would have used and may arrive in any
order, duplicated, or re-sent wholesale after a reconnect. :class:`Reassembler` puts them
back together under hard limits: a transfer's declared size is reserved against its
sender's budget and the global one on its first frame (and refused if it does not fit),
but memory is only taken as data arrives, so a header declaring 256 MiB costs nothing
until 256 MiB have come.

Copies are what a large transfer costs, so neither side makes one it can avoid:
:func:`split` builds each frame with a single join of header and payload slice (and
checksums that fresh copy, while it is in the CPU cache), and the
:class:`Reassembler` keeps the chunks of an in-order transfer (the normal case on one MQTT
connection) as views of the received frames and joins them once, at completion, into the
payload; only an out-of-order or overlapping arrival falls back to segments written as
the bytes come.

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
    "BUDGET_REASONS",
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


#: Rejection reasons that mean "this sender is over its share", not "this frame is bad".
BUDGET_REASONS = frozenset({"sender_bytes", "sender_transfers"})


class _Transfer:
    """One transfer in progress: what was received so far, and where it belongs.

    Memory is taken as data arrives, never for the declared total (which a hostile header
    can set to anything). While chunks arrive in order, each one's data is kept as a view
    of its frame (``pieces``) and the payload is joined once, at completion: one copy of
    every byte. The first chunk that is not the next in line (out of order, a duplicate,
    an overlap), or one piece too many, moves the transfer to ``segments``: sorted,
    disjoint bytearrays holding exactly the bytes received, joined once at completion. A
    chunk that continues a segment is appended to it (amortised O(1) a byte); only a chunk
    with nothing received right before it opens a new segment, and their number is capped
    (``fragmented``).
    """

    __slots__ = (
        "bufs",
        "covered",
        "last_progress",
        "pieces",
        "sender",
        "starts",
        "total",
    )

    def __init__(self, total: int, sender: str, now: float) -> None:
        self.total = total
        self.sender = sender
        self.pieces: list[memoryview] | None = []
        # Segments mode: starts[i] is where bufs[i] begins; never adjacent, never overlapping.
        self.starts: list[int] = []
        self.bufs: list[bytearray] = []
        self.covered = 0
        self.last_progress = now

    def to_segments(self) -> None:
        """Leave pieces mode: what came so far becomes one segment (one copy of it)."""
        if self.pieces is not None:
            if self.covered:
                self.starts, self.bufs = [0], [_JOIN(self.pieces)]
            self.pieces = None


@dataclass(slots=True)
class _Sender:
    """What one sender has in progress: transfers and the bytes they declared."""

    transfers: int = 0
    reserved: int = 0


class Reassembler:
    """Reassemble chunked transfers, keyed by (topic, transfer id), under hard limits.

    Limits, all checked on a transfer's first frame before it takes any memory:

    * ``max_transfer_size`` bounds any one transfer's declared size;
    * per sender (``feed``'s ``sender``: whoever the topic says published it), when set,
      ``max_sender_bytes`` bounds the sum of the declared sizes of its transfers in
      progress and ``max_sender_transfers`` their number. A new transfer past either is
      refused (``sender_bytes``, ``sender_transfers``): a sender flooding headers that
      declare huge sizes reaches its own budget and locks out no one but itself;
    * over all senders, ``max_bytes`` bounds the sum of declared sizes and
      ``max_transfers`` the number of transfers. A transfer past either is refused
      (``when_full="refuse"``) or makes room by evicting the transfers that progressed
      least recently (``when_full="evict_stalest"``): transfers that never complete then
      cannot lock out live ones, which progress all the time. Evictions are counted and
      reported by :meth:`drain_evicted`.

    Declared sizes are only reserved, never allocated: memory grows with the bytes that
    really arrive (:attr:`held_bytes` <= :attr:`pending_bytes`), so the memory a sender
    can pin is its budget at most, whatever its headers claim.
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
        max_sender_bytes: int | None = None,
        max_sender_transfers: int | None = None,
    ) -> None:
        limits = (
            max_bytes,
            max_transfers,
            max_transfer_size,
            max_sender_bytes or 0,
            max_sender_transfers or 0,
        )
        if min(limits) < 0 or not timeout_s > 0:
            raise ChunkError("Reassembler limits must be non-negative and timeout_s positive")
        if when_full not in ("refuse", "evict_stalest"):
            raise ChunkError(f"when_full must be 'refuse' or 'evict_stalest', not {when_full!r}")
        self.when_full = when_full
        self._evicted: list[tuple[str, bytes]] = []
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self.max_transfer_size = max_transfer_size
        self.max_sender_bytes = max_sender_bytes
        self.max_sender_transfers = max_sender_transfers
        self.timeout_s = timeout_s
        self.stats = ReassemblerStats()
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}
        self._senders: dict[str, _Sender] = {}
        self._completed: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._pending = 0
        self._held = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes declared by transfers in progress (never above ``max_bytes``)."""
        return self._pending

    @property
    def held_bytes(self) -> int:
        """Payload bytes really held by transfers in progress (<= :attr:`pending_bytes`)."""
        return self._held

    @property
    def pending_transfers(self) -> int:
        """Number of transfers in progress."""
        return len(self._transfers)

    def sender_pending_bytes(self, sender: str) -> int:
        """Bytes declared by ``sender``'s transfers in progress."""
        use = self._senders.get(sender)
        return 0 if use is None else use.reserved

    def _reject(self, reason: str, message: str) -> ChunkError:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        return ChunkError(message, reason)

    def feed(
        self,
        key: str,
        frame: bytes | bytearray | memoryview,
        now: float,
        sender: str | None = None,
    ) -> bytes | bytearray | None:
        """Take one chunk frame received on topic ``key`` from ``sender`` at time ``now``.

        ``sender`` (default: ``key``) is who is accountable for the frame; its transfers
        share one budget. Returns the whole payload when this frame completes its transfer,
        else None: a new ``bytes`` when the chunks came in order, else a ``bytearray``; the
        Reassembler keeps no reference to it. Until then it may keep a view of ``frame``
        rather than a copy: a caller must not modify a frame after feeding it. Duplicates,
        including late ones for a transfer completed recently, are counted in
        ``stats.duplicates`` and return None. Bad frames and frames over the limits raise
        :class:`ChunkError` (its ``reason`` says which) and are counted.
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
            transfer = self._start(tkey, header.total_size, key if sender is None else sender, now)
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
            # moves to segments, so bookkeeping stays a small fraction of its size.
            and len(pieces) < max(64, transfer.total >> 14)
        ):
            pieces.append(data)  # the next chunk in line: nothing to compare, no copy yet
            transfer.covered += header.length
            self._held += header.length
        else:
            before = transfer.covered
            if not self._store(transfer, header, data):
                self.stats.duplicates += 1
                return None
            self._held += transfer.covered - before
        transfer.last_progress = now
        if transfer.covered < transfer.total:
            return None
        self._drop(tkey)
        self._finish(tkey)
        if transfer.pieces is None:
            bufs = transfer.bufs
            # Adjacent segments, joined once (one segment is the payload as it is).
            return bufs[0] if len(bufs) == 1 else _JOIN(bufs)
        # The one copy of an in-order transfer; bytes.join does not zero-fill first.
        return b"".join(transfer.pieces)

    def _start(self, tkey: tuple[str, bytes], total: int, sender: str, now: float) -> _Transfer:
        # Every check happens before the transfer exists: a refused one costs nothing.
        if total > self.max_transfer_size:
            raise self._reject(
                "too_large", f"transfer of {total} bytes exceeds {self.max_transfer_size}"
            )
        use = self._senders.get(sender) or _Sender()
        if self.max_sender_transfers is not None and use.transfers >= self.max_sender_transfers:
            raise self._reject(
                "sender_transfers",
                f"{sender!r} already has {use.transfers} transfers in progress "
                f"(max_sender_transfers {self.max_sender_transfers})",
            )
        if self.max_sender_bytes is not None and use.reserved + total > self.max_sender_bytes:
            raise self._reject(
                "sender_bytes",
                f"transfer of {total} bytes from {sender!r} would exceed its budget "
                f"({use.reserved} pending of max_sender_bytes {self.max_sender_bytes})",
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
        transfer = _Transfer(total, sender, now)
        self._transfers[tkey] = transfer
        self._senders[sender] = use
        use.transfers += 1
        use.reserved += total
        self._pending += total
        return transfer

    def _drop(self, tkey: tuple[str, bytes]) -> None:
        """Forget a transfer in progress (completed, expired or evicted) and its accounts."""
        transfer = self._transfers.pop(tkey)
        self._pending -= transfer.total
        self._held -= transfer.covered
        use = self._senders[transfer.sender]
        use.transfers -= 1
        use.reserved -= transfer.total
        if not use.transfers:
            del self._senders[transfer.sender]

    def _make_room(self, total: int) -> None:
        """Evict least-recently-progressed transfers until one more of ``total`` bytes fits."""
        while self._transfers and (
            len(self._transfers) >= self.max_transfers or self._pending + total > self.max_bytes
        ):
            tkey = min(self._transfers, key=lambda k: self._transfers[k].last_progress)
            self._drop(tkey)
            self.stats.evicted += 1
            self._evicted.append(tkey)

    def drain_evicted(self) -> list[tuple[str, bytes]]:
        """(key, transfer id) of the transfers evicted since the last call."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _store(self, t: _Transfer, header: ChunkHeader, data: memoryview) -> bool:
        """Write the new parts of a chunk into ``t``'s segments; whether any byte was new.

        Nothing is written unless the whole chunk is acceptable: a conflicting overlap or
        one disjoint piece too many is refused before any byte moves.
        """
        t.to_segments()
        starts, bufs = t.starts, t.bufs
        start, end = header.offset, header.offset + header.length
        # Segments first..hi-1 may overlap [start, end); only `first` can touch `start`.
        first = max(bisect_right(starts, start) - 1, 0)
        hi = bisect_left(starts, end)
        gaps: list[tuple[int, int]] = []
        cursor = start
        touches_left = False
        for i in range(first, hi):
            s0 = starts[i]
            s1 = s0 + len(bufs[i])
            if s1 < start:
                continue
            touches_left = touches_left or s0 <= start
            a, b = max(s0, start), min(s1, end)
            # A bytearray slice + memcmp is ~20x faster than comparing memoryviews.
            if a < b and bufs[i][a - s0 : b - s0] != data[a - start : b - start]:
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
        # Every gap but the first follows a segment; the first opens a new segment unless
        # a segment ends where it starts. Bookkeeping stays under ~2% of the transfer,
        # however scattered the arrival order: tiny scattered chunks cannot grow it past that.
        if not touches_left and len(starts) >= max(1024, t.total // 4096):
            raise self._reject("fragmented", "transfer arrives in too many disjoint pieces")
        for a, b in gaps:
            i = bisect_right(starts, a) - 1
            if i >= 0 and starts[i] + len(bufs[i]) == a:
                # Appending is amortised O(1) a byte. Segments are never merged with the
                # one after them: a merge copies that segment, and a peer closing gaps
                # right to left could make us copy a large one again and again.
                bufs[i] += data[a - start : b - start]
            else:
                starts.insert(i + 1, a)
                bufs.insert(i + 1, bytearray(data[a - start : b - start]))
            t.covered += b - a
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
            self._drop(tkey)
        self.stats.expired += len(dropped)
        return dropped
