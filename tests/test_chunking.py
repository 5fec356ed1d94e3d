"""Tests for emo_mqtt.chunking: split/reassemble, hostile frames and memory limits."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tracemalloc
import zlib

import pytest

from emo_mqtt.chunking import (
    CHUNK_MAGIC,
    CHUNK_VERSION,
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    ChunkHeader,
    Reassembler,
    is_chunk_frame,
    parse_frame,
    split,
)
from emo_mqtt.errors import ChunkError, CodecError

TID = bytes(range(16))


def feed_all(
    r: Reassembler, frames: list[bytearray] | list[bytes], key: str = "t", now: float = 0.0
) -> list[bytes]:
    return [bytes(out) for f in frames if (out := r.feed(key, f, now)) is not None]


def frame(tid: bytes, total: int, offset: int, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(data) if crc is None else crc
    head = struct.pack("<3sB16sQQI", CHUNK_MAGIC, CHUNK_VERSION, tid, total, offset, crc)
    return head + data


def test_default_chunk_size_fits_brokers_with_2mb_cap() -> None:
    assert DEFAULT_CHUNK_SIZE + HEADER_SIZE <= 2**20


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 1000])
def test_split_and_reassemble_sizes(size: int) -> None:
    payload = os.urandom(size)
    frames = split(payload, chunk_size=100)
    assert len(frames) == max(1, -(-size // 100))
    assert all(is_chunk_frame(f) and len(f) <= HEADER_SIZE + 100 for f in frames)
    r = Reassembler()
    assert feed_all(r, frames) == [payload]
    assert r.pending_bytes == 0 and r.pending_transfers == 0 and r.stats.completed == 1


def test_split_cuts_even_chunks_not_a_short_tail() -> None:
    payload = os.urandom(1001)
    frames = split(payload, chunk_size=100)
    sizes = [parse_frame(f)[0].length for f in frames]
    # 11 chunks either way, but of 91 bytes each rather than ten of 100 and one of 1.
    assert len(frames) == 11 and max(sizes) - min(sizes) <= 1 and max(sizes) <= 100
    assert all(isinstance(f, bytearray) for f in frames)  # CRC filled in after the copy
    assert feed_all(Reassembler(), frames) == [payload]


def test_in_order_chunks_are_joined_once_into_bytes() -> None:
    payload = os.urandom(5000)
    frames = split(payload, chunk_size=1000)
    r = Reassembler()
    assert [r.feed("t", f, 0.0) for f in frames[:-1]] == [None] * 4
    assert r.pending_bytes == 5000  # reserved on the first frame, as for a buffer
    out = r.feed("t", frames[-1], 0.0)
    assert type(out) is bytes and out == payload
    assert r.pending_bytes == 0


def test_a_chunk_out_of_line_moves_the_transfer_to_a_buffer() -> None:
    payload = os.urandom(5000)
    frames = split(payload, chunk_size=1000)
    r = Reassembler()
    # Two in line, a duplicate of the first, then one ahead of its turn, then the rest.
    for f in (frames[0], frames[1], frames[0], frames[3], frames[2]):
        assert r.feed("t", f, 0.0) is None
    out = r.feed("t", frames[4], 0.0)
    assert isinstance(out, bytearray) and out == payload
    assert r.stats.duplicates == 1 and r.stats.completed == 1
    # A conflicting overlap is still caught after the move from pieces to a buffer.
    r = Reassembler()
    r.feed("t", frame(TID, 10, 0, b"abcd"), 0.0)
    with pytest.raises(ChunkError, match="disagrees"):
        r.feed("t", frame(TID, 10, 2, b"XY"), 0.0)
    assert r.feed("t", frame(TID, 10, 4, b"efghij"), 0.0) == b"abcdefghij"


def test_tiny_in_order_chunks_do_not_pile_up_as_pieces() -> None:
    # One view per 1-byte chunk would cost far more than the bytes: past a cap, the
    # transfer moves to a buffer (and completes as a bytearray).
    payload = os.urandom(3000)
    out = feed_all_raw(Reassembler(), split(payload, chunk_size=1))
    assert isinstance(out, bytearray) and out == payload


def feed_all_raw(r: Reassembler, frames: list[bytearray]) -> bytes | bytearray | None:
    outs = [out for f in frames if (out := r.feed("t", f, 0.0)) is not None]
    assert len(outs) == 1
    return outs[0]


def test_ten_megabytes_default_chunks_random_order() -> None:
    payload = os.urandom(10 * 2**20)
    frames = split(payload)
    assert len(frames) == 20
    random.Random(0).shuffle(frames)
    r = Reassembler()
    results = [r.feed("t", f, 0.0) for f in frames]
    assert all(x is None for x in results[:-1])
    out = results[-1]
    assert isinstance(out, bytearray) and out == payload


def test_zero_size_payload_completes_on_its_only_frame() -> None:
    (only,) = split(b"", transfer_id=TID)
    header, data = parse_frame(only)
    assert header == ChunkHeader(TID, 0, 0, 0, 0) and len(data) == 0
    r = Reassembler()
    assert r.feed("t", only, 0.0) == b""
    assert r.feed("t", only, 0.0) is None  # late duplicate
    assert r.stats.duplicates == 1


def test_parse_frame_and_split_arguments() -> None:
    frames = split(memoryview(b"abcdefg"), chunk_size=3, transfer_id=TID)
    header, data = parse_frame(memoryview(frames[2]))
    assert header == ChunkHeader(TID, 7, 6, 1, zlib.crc32(b"g")) and bytes(data) == b"g"
    assert split(b"x")[0][4:20] != split(b"x")[0][4:20]  # fresh random transfer ids
    with pytest.raises(ChunkError, match="chunk_size"):
        split(b"abc", chunk_size=0)
    with pytest.raises(ChunkError, match="16 bytes"):
        split(b"abc", transfer_id=b"short")
    assert not is_chunk_frame(b"EMO\x01xxxx") and not is_chunk_frame(b"EM")


def test_random_order_with_duplicates_counts_each_duplicate_once() -> None:
    payload = os.urandom(5000)
    frames = split(payload, chunk_size=64)
    stream = frames + random.Random(1).sample(frames, 30)
    random.Random(2).shuffle(stream)
    r = Reassembler()
    assert feed_all(r, stream) == [payload]
    # Every duplicate is counted, before or after completion, and none completes twice.
    assert r.stats.duplicates == 30 and r.stats.completed == 1


def test_resend_after_reconnect_with_other_chunk_size() -> None:
    payload = os.urandom(3000)
    r = Reassembler()
    first = split(payload, chunk_size=500, transfer_id=TID)
    assert feed_all(r, first[:3]) == []
    # The sender reconnects and re-sends everything, split differently: overlaps that
    # agree are fine, and only the really new bytes make progress.
    again = split(payload, chunk_size=700, transfer_id=TID)
    assert feed_all(r, again) == [payload]
    assert r.stats.completed == 1 and r.stats.duplicates == 2


def test_interleaved_transfers_same_and_different_keys() -> None:
    payloads = {("a", 1): os.urandom(900), ("a", 2): os.urandom(1000), ("b", 1): os.urandom(700)}
    stream = [
        (key, f)
        for (key, n), p in payloads.items()
        for f in split(p, chunk_size=128, transfer_id=bytes([n]) * 16)
    ]
    random.Random(3).shuffle(stream)
    r = Reassembler()
    done = {}
    for key, f in stream:
        out = r.feed(key, f, 0.0)
        if out is not None:
            done[(key, parse_frame(f)[0].transfer_id[0])] = bytes(out)
    assert done == payloads and r.pending_bytes == 0


def test_checksum_corruption_is_refused() -> None:
    good = split(b"hello world", transfer_id=TID)[0]
    bad = bytearray(good)
    bad[-1] ^= 0x01
    r = Reassembler()
    with pytest.raises(ChunkError, match="checksum mismatch"):
        r.feed("t", bytes(bad), 0.0)
    with pytest.raises(ChunkError, match="checksum"):
        parse_frame(bad)
    assert r.stats.rejected == {"checksum": 1} and r.pending_transfers == 0
    assert r.feed("t", good, 0.0) == b"hello world"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "truncated"),
        (b"EMC\x01" + bytes(20), "truncated"),
        (frame(TID, 10, 0, b"abc")[:3] + b"\x02" + frame(TID, 10, 0, b"abc")[4:], "version 2"),
        (b"XYZ" + frame(TID, 10, 0, b"abc")[3:], "bad magic"),
        (frame(TID, 10, 8, b"abc"), r"overruns total size 10"),
        (frame(TID, 2**64 - 1, 2**64 - 2, b"abc"), "overruns"),
        (frame(TID, 10, 0, b""), "empty chunk"),
        (frame(TID, 10, 0, b"abc", crc=1), "checksum"),
    ],
)
def test_malformed_frames(data: bytes, expected: str) -> None:
    with pytest.raises(ChunkError, match=expected):
        parse_frame(data)
    r = Reassembler()
    with pytest.raises(ChunkError, match=expected):
        r.feed("t", data, 0.0)
    assert r.pending_bytes == 0 and sum(r.stats.rejected.values()) == 1


def test_chunk_error_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        parse_frame(b"nope")
    with pytest.raises(ChunkError, match="bytes-like"):
        parse_frame(123)  # type: ignore[arg-type]


def test_inconsistent_total_and_conflicting_overlap() -> None:
    r = Reassembler()
    assert r.feed("t", frame(TID, 10, 0, b"abcd"), 0.0) is None
    with pytest.raises(ChunkError, match="total size 11"):
        r.feed("t", frame(TID, 11, 4, b"efgh"), 0.0)
    with pytest.raises(ChunkError, match="disagrees"):
        r.feed("t", frame(TID, 10, 2, b"XYef"), 0.0)
    assert r.stats.rejected == {"inconsistent": 1, "conflict": 1}
    # The transfer survives the bad frames and completes with the right bytes.
    assert r.feed("t", frame(TID, 10, 2, b"cdefghij"), 0.0) == b"abcdefghij"


def test_limits_refuse_new_transfers_without_evicting() -> None:
    r = Reassembler(max_bytes=1000, max_transfers=2, max_transfer_size=600)
    with pytest.raises(ChunkError, match="exceeds 600"):
        r.feed("t", frame(b"a" * 16, 601, 0, b"x"), 0.0)
    assert r.feed("t", frame(b"b" * 16, 600, 0, b"x"), 0.0) is None
    with pytest.raises(ChunkError, match="max_bytes"):
        r.feed("t", frame(b"c" * 16, 500, 0, b"x"), 0.0)
    assert r.feed("t", frame(b"d" * 16, 400, 0, b"x"), 0.0) is None
    assert r.pending_bytes == 1000 and r.pending_transfers == 2
    with pytest.raises(ChunkError, match="transfers already in progress"):
        r.feed("t", frame(b"e" * 16, 1, 0, b"x"), 0.0)
    assert r.stats.rejected == {"too_large": 1, "max_bytes": 1, "max_transfers": 1}
    # The live transfers were not evicted: they still complete.
    assert r.feed("t", frame(b"d" * 16, 400, 1, b"\x00" * 399), 0.0) == b"x" + b"\x00" * 399
    assert r.pending_bytes == 600


def test_expiry_drops_stalled_transfers_only() -> None:
    r = Reassembler(timeout_s=10.0)
    slow_payload = os.urandom(300)
    slow, fast = split(slow_payload, chunk_size=100), split(os.urandom(300), chunk_size=100)
    r.feed("a", slow[0], 0.0)
    r.feed("b", fast[0], 0.0)
    r.feed("b", fast[1], 8.0)
    r.feed("a", slow[0], 8.0)  # a duplicate is not progress
    assert r.expire(9.9) == []
    dropped = r.expire(10.0)
    assert dropped == [("a", parse_frame(slow[0])[0].transfer_id)]
    assert r.stats.expired == 1 and r.pending_transfers == 1 and r.pending_bytes == 300
    assert r.feed("b", fast[2], 12.0) is not None
    # A re-send of the expired transfer starts it afresh and can still complete.
    assert feed_all(r, slow, key="a", now=20.0) == [slow_payload]


def test_late_duplicate_after_completion_does_not_restart() -> None:
    payload = os.urandom(1000)
    frames = split(payload, chunk_size=100)
    r = Reassembler()
    assert feed_all(r, frames) == [payload]
    assert feed_all(r, frames[::-1]) == []
    assert r.stats.duplicates == 10 and r.pending_transfers == 0 and r.pending_bytes == 0
    # The same id on another topic is a different transfer.
    assert feed_all(r, frames, key="other") == [payload]


def test_completed_memory_is_bounded() -> None:
    r = Reassembler()
    for i in range(1500):
        r.feed("t", split(b"x", transfer_id=i.to_bytes(16, "big"))[0], 0.0)
    assert r.stats.completed == 1500
    # The oldest ids have been forgotten, the recent ones are still recognised.
    assert r.feed("t", split(b"x", transfer_id=(1499).to_bytes(16, "big"))[0], 0.0) is None
    assert r.feed("t", split(b"x", transfer_id=(0).to_bytes(16, "big"))[0], 0.0) == b"x"


def test_fragmentation_is_bounded() -> None:
    r = Reassembler()
    total = 100_000  # allows max(1024, total // 4096) = 1024 disjoint ranges
    for i in range(1024):
        r.feed("t", frame(TID, total, 2 * i, b"x"), 0.0)
    with pytest.raises(ChunkError, match="too many disjoint pieces"):
        r.feed("t", frame(TID, total, 5000, b"x"), 0.0)
    # Filling a gap merges ranges and is still accepted.
    assert r.feed("t", frame(TID, total, 1, b"\x00"), 0.0) is None


def test_pending_bytes_never_exceeds_max_bytes_under_a_flood() -> None:
    rng = random.Random(4)
    r = Reassembler(max_bytes=50_000, max_transfers=8, max_transfer_size=40_000, timeout_s=5)
    for step in range(2000):
        tid = rng.randrange(30).to_bytes(16, "big")
        total = rng.choice([10, 1000, 20_000, 39_999, 60_000])
        offset = rng.randrange(total)
        data = os.urandom(min(rng.randrange(1, 3000), total - offset))
        with contextlib.suppress(ChunkError):
            r.feed(f"k{rng.randrange(3)}", frame(tid, total, offset, data), step / 100)
        assert r.pending_bytes <= 50_000 and r.pending_transfers <= 8
        if step % 50 == 0:
            r.expire(step / 100)
    assert sum(r.stats.rejected.values()) > 0


def test_evict_stalest_lets_live_transfers_through_a_flood() -> None:
    """A flood of never-completed transfers cannot lock out a transfer that is progressing."""
    r = Reassembler(max_transfers=4, max_bytes=10_000, when_full="evict_stalest")
    for i in range(10):  # ten abandoned transfers, one chunk each
        r.feed("t", split(b"v" * 2000, chunk_size=500)[0], now=float(i))
    assert r.pending_transfers == 4
    assert r.pending_bytes <= 10_000
    assert len(r.drain_evicted()) == 6 and r.stats.evicted == 6
    live = split(b"L" * 3000, chunk_size=1000)
    out = None
    for n, frame in enumerate(live):
        out = r.feed("t", frame, now=20.0 + n)
        # Each new vandal transfer evicts a stale vandal, never the live transfer.
        r.feed("t", split(b"w" * 2000, chunk_size=500)[0], now=20.5 + n)
    assert out == bytearray(b"L" * 3000)
    assert r.drain_evicted() and r.pending_bytes <= 10_000


def test_refuse_policy_is_the_default() -> None:
    r = Reassembler(max_transfers=1)
    r.feed("t", split(b"a" * 100, chunk_size=10)[0], now=0.0)
    with pytest.raises(ChunkError, match="already in progress"):
        r.feed("t", split(b"b" * 100, chunk_size=10)[0], now=1.0)
    with pytest.raises(ChunkError, match="when_full"):
        Reassembler(when_full="drop")  # type: ignore[arg-type]


# ----------------------------------------------------------------- hostile senders


def _header_only(tid: bytes, total: int, offset: int = 0) -> bytes:
    """A 41-byte chunk frame: one byte of data in a transfer declaring ``total`` bytes."""
    return frame(tid, total, offset, b"\x00")


def test_a_flood_of_huge_declarations_costs_nothing_and_is_counted() -> None:
    r = Reassembler(max_sender_bytes=64 * 2**20, max_sender_transfers=8)
    tracemalloc.start()
    try:
        for i in range(200):
            flood = _header_only(i.to_bytes(16, "big"), 256 * 2**20, offset=i * 1000)
            assert len(flood) == 41
            with pytest.raises(ChunkError) as caught:
                r.feed("emo/r/device/dev07/update", flood, 0.0, sender="device/dev07")
            assert caught.value.reason == "sender_bytes"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # 200 x 256 MiB declared, not even 1 MiB taken
    assert r.stats.rejected == {"sender_bytes": 200}
    assert r.pending_transfers == 0 and r.pending_bytes == 0 and r.held_bytes == 0


def test_declared_sizes_are_reserved_not_allocated() -> None:
    """Memory follows the bytes that arrive, in order or not, never the declared size."""
    r = Reassembler(max_sender_bytes=64 * 2**20)
    total = 60 * 2**20
    tracemalloc.start()
    try:
        r.feed("t", _header_only(b"a" * 16, total, offset=0), 0.0, sender="s")
        r.feed(
            "t", _header_only(b"b" * 16, total // 64, offset=total // 64 - 1), 0.0, sender="other"
        )  # out of order: its last byte first
        r.feed("t", _header_only(b"a" * 16, total, offset=total - 1), 0.0, sender="s")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert r.pending_bytes == total + total // 64 and r.held_bytes == 3
    assert r.sender_pending_bytes("s") == total and r.sender_pending_bytes("nobody") == 0


def test_a_sender_over_its_transfer_cap_locks_out_only_itself() -> None:
    r = Reassembler(max_sender_bytes=10_000, max_sender_transfers=3)
    for i in range(3):
        assert (
            r.feed(
                "emo/r/device/dev07/update",
                _header_only(bytes([i]) * 16, 3000),
                0.0,
                sender="device/dev07",
            )
            is None
        )
    for i in range(3, 200):
        with pytest.raises(ChunkError, match="transfers in progress") as caught:
            r.feed(
                "emo/r/device/dev07/update",
                _header_only(bytes([i]) * 16, 1000),
                0.0,
                sender="device/dev07",
            )
        assert caught.value.reason == "sender_transfers"
    assert r.stats.rejected == {"sender_transfers": 197}
    assert r.held_bytes == 3 and r.sender_pending_bytes("device/dev07") == 9000
    # Another sender's legitimate transfer goes through untouched, as fast as ever.
    payload = os.urandom(9000)
    assert feed_all_from(r, split(payload, chunk_size=1000), "device/dev01") == [payload]
    assert r.stats.evicted == 0
    # Once its stalled transfers expire, the flooder gets a fresh budget.
    assert len(r.expire(100.0)) == 3 and r.sender_pending_bytes("device/dev07") == 0
    assert r.held_bytes == 0 and r.pending_bytes == 0


def feed_all_from(r: Reassembler, frames: list[bytearray], sender: str) -> list[bytes]:
    return [bytes(out) for f in frames if (out := r.feed("k", f, 0.0, sender)) is not None]


def test_sender_budget_counts_declared_bytes_and_is_released_on_completion() -> None:
    r = Reassembler(max_sender_bytes=5000)
    first = split(os.urandom(3000), chunk_size=1000)
    second = split(os.urandom(3000), chunk_size=1000)
    r.feed("k", first[0], 0.0, "s")
    with pytest.raises(ChunkError, match="budget"):
        r.feed("k", second[0], 0.0, "s")
    assert feed_all_from(r, first[1:], "s") != []
    assert r.sender_pending_bytes("s") == 0
    assert len(feed_all_from(r, second, "s")) == 1


def test_reverse_order_tiny_chunks_are_fragmented_not_quadratic() -> None:
    # Right to left, each chunk opens a segment of its own (none ends where it starts);
    # past the cap the rest are refused instead of being merged at a cost of O(size) each.
    total = 4 * 2**20
    r = Reassembler()
    refused = 0
    for i in range(1, 1200):
        try:
            r.feed("t", frame(TID, total, total - 2 * i, b"x"), 0.0)
        except ChunkError as exc:
            assert exc.reason == "fragmented"
            refused += 1
    assert refused == 1199 - 1024 and r.held_bytes == 1024


def test_out_of_order_then_in_line_completes_with_the_right_bytes() -> None:
    payload = os.urandom(70_000)
    frames = split(payload, chunk_size=1000)
    order = frames[10:] + frames[:10]  # a late head: two segments, joined at the end
    r = Reassembler()
    out = feed_all_raw(r, order)
    assert out == payload and r.held_bytes == 0 and r.pending_bytes == 0
