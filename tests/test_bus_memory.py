"""The bus interface on the in-memory broker: chunking, retained, wills, sessions, backpressure."""

from __future__ import annotations

import asyncio
import struct
import zlib

import numpy as np
import pytest
from conftest import take_messages

from emo_mqtt import codec
from emo_mqtt.bus import BusOptions, MemoryBroker, MemoryBus, Message
from emo_mqtt.chunking import CHUNK_MAGIC, CHUNK_VERSION, is_chunk_frame, split
from emo_mqtt.errors import BusError


async def test_small_and_chunked_messages_arrive_whole() -> None:
    broker = MemoryBroker()
    options = BusOptions(chunk_size=4096)
    async with (
        MemoryBus(broker, "a", options=options) as a,
        MemoryBus(broker, "b", options=options) as b,
    ):
        await b.subscribe("emo/r/#")
        big = np.arange(100_000, dtype=np.float32)
        await a.publish("emo/r/x", codec.encode({"x": big}, kind="t"))
        await a.publish("emo/r/y", b"hello")
        got = await take_messages(b, 2, within_s=5.0)
    assert got[0].topic == "emo/r/x"
    assert np.array_equal(codec.decode(got[0].payload).body["x"], big)
    assert got[1].payload == b"hello"
    assert a.stats.published_frames > 2
    assert a.stats.published_bytes > big.nbytes
    assert b.stats.received_messages == 2


async def test_retained_message_reaches_late_subscriber() -> None:
    broker = MemoryBroker()
    async with MemoryBus(broker, "a") as a, MemoryBus(broker, "b") as b:
        await a.publish("emo/r/server/round", b"round-3", retain=True)
        await b.subscribe("emo/r/server/+")
        (got,) = await take_messages(b, 1, within_s=5.0)
    assert got.payload == b"round-3"


async def test_large_retained_payload_is_refused() -> None:
    broker = MemoryBroker()
    async with MemoryBus(broker, "a", options=BusOptions(chunk_size=1024)) as a:
        with pytest.raises(BusError, match="retained payload"):
            await a.publish("emo/r/x", b"x" * 5000, retain=True)


async def test_last_will_on_crash_not_on_clean_close() -> None:
    broker = MemoryBroker()
    async with MemoryBus(broker, "watcher") as watcher:
        await watcher.subscribe("emo/r/status/#")
        will = Message("emo/r/status/device/d1", b"offline", 1, True)
        clean = MemoryBus(broker, "d1", will=will)
        await clean.connect()
        await clean.close()
        crashing = MemoryBus(broker, "d1", will=will)
        await crashing.connect()
        crashing.abort()
        (got,) = await take_messages(watcher, 1, within_s=5.0)
    assert got.payload == b"offline"
    assert broker.retained["emo/r/status/device/d1"].payload == b"offline"


async def test_persistent_session_keeps_messages_while_offline() -> None:
    broker = MemoryBroker()
    sub = MemoryBus(broker, "sub")
    await sub.connect()
    await sub.subscribe("emo/r/#")
    await sub.close()
    async with MemoryBus(broker, "pub") as pub:
        await pub.publish("emo/r/a", b"while-away")
    again = MemoryBus(broker, "sub")
    async with again:
        (got,) = await take_messages(again, 1, within_s=5.0)
    assert got.payload == b"while-away"


async def test_backpressure_pauses_instead_of_dropping() -> None:
    broker = MemoryBroker()
    options = BusOptions(inbox_max_frames=8)
    async with MemoryBus(broker, "pub") as pub, MemoryBus(broker, "sub", options=options) as sub:
        await sub.subscribe("emo/r/#")
        for i in range(100):
            await pub.publish("emo/r/n", str(i).encode())
        # The inbox holds at most its bound; the rest waits at the broker, nothing is lost.
        assert sub.inbox_size <= 8
        assert sub.stats.pauses >= 1
        got = await take_messages(sub, 100, within_s=5.0)
    assert [int(m.payload) for m in got] == list(range(100))
    assert broker.dropped == 0


async def test_malformed_chunks_are_counted_not_raised() -> None:
    broker = MemoryBroker()
    async with MemoryBus(broker, "pub") as pub, MemoryBus(broker, "sub") as sub:
        await sub.subscribe("emo/r/#")
        frames = split(b"y" * 5000, chunk_size=1000)
        corrupt = bytearray(frames[1])
        corrupt[-1] ^= 0xFF
        assert is_chunk_frame(corrupt)
        await pub.publish("emo/r/x", bytes(corrupt))
        await pub.publish("emo/r/x", frames[0][:20])
        await pub.publish("emo/r/x", b"after")
        (got,) = await take_messages(sub, 1, within_s=5.0)
    assert got.payload == b"after"
    assert sub.stats.rejected["bad_chunk"] == 2


async def test_incomplete_transfer_times_out_and_is_counted() -> None:
    broker = MemoryBroker()
    options = BusOptions(reassembly_timeout_s=0.05)
    async with MemoryBus(broker, "pub") as pub, MemoryBus(broker, "sub", options=options) as sub:
        await sub.subscribe("emo/r/#")
        frames = split(b"z" * 5000, chunk_size=1000)
        await pub.publish("emo/r/x", frames[0])
        # Chunks are reassembled on arrival, before anyone reads the bus.
        assert sub.reassembly_pending_bytes == 5000

        async def drain() -> None:
            async for _ in sub.messages():
                pass

        reader = asyncio.create_task(drain())
        await asyncio.sleep(0.1)
        assert sub.reassembly_pending_bytes == 5000
        await asyncio.sleep(2.2)  # expiry runs at most once a second
        reader.cancel()
    assert sub.stats.rejected["chunk_timeout"] == 1
    assert sub.reassembly_pending_bytes == 0


async def test_publish_after_close_is_an_error() -> None:
    bus = MemoryBus(MemoryBroker(), "a")
    await bus.connect()
    await bus.close()
    with pytest.raises(BusError):
        await bus.publish("emo/r/x", b"1")


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        BusOptions(chunk_size=4 * 2**20)


def tiny_chunk(n: int, declared: int) -> bytes:
    """A 41-byte chunk frame: one byte of a transfer (id ``n``) declaring ``declared`` bytes."""
    head = struct.pack(
        "<3sB16sQQI",
        CHUNK_MAGIC,
        CHUNK_VERSION,
        n.to_bytes(16, "big"),
        declared,
        0,
        zlib.crc32(b"\x00"),
    )
    return head + b"\x00"


async def test_a_chunk_flood_is_refused_per_sender_and_delivery_goes_on() -> None:
    broker = MemoryBroker()
    options = BusOptions(reassembly_max_sender_bytes=4 * 2**20, reassembly_max_sender_transfers=4)
    async with (
        MemoryBus(broker, "dev07") as attacker,
        MemoryBus(broker, "dev01") as honest,
        MemoryBus(broker, "server", options=options) as server,
    ):
        await server.subscribe("emo/r/device/+/update")
        for n in range(200):
            # Half declare 256 MiB (over the 4 MiB budget), half 64 KiB (4 fit the cap).
            declared = 256 * 2**20 if n % 2 else 64 * 1024
            await attacker.publish("emo/r/device/dev07/update", tiny_chunk(n, declared))
        payload = codec.encode({"w": np.arange(500_000, dtype=np.float32)}, kind="update")
        await honest.publish("emo/r/device/dev01/update", payload)  # 2 MB: chunked
        (got,) = await take_messages(server, 1, within_s=5.0)
    assert got.topic == "emo/r/device/dev01/update" and got.payload == payload
    assert server.stats.rejected == {"chunk_budget": 196}
    assert server.reassembly_held_bytes == 4  # four bytes of the flood, nothing more
