"""Attacks by one device (or buggy firmware) against a real Mosquitto, outside the node layer.

Each test starts its own broker (conftest's fixtures or a provisioned TLS broker with ACLs)
on a free port, plays the attacker with nothing but what a device holds (its own
credentials, topics its ACLs let it write), and shows that the receiving side keeps
working and counts what it refused:

* a flood of tiny chunk frames declaring huge transfers (the bus's reassembler);
* retained telemetry that is not ours: deep JSON, lists, malformed JSON, wrong types
  (``emo run``'s monitor and the dashboard);
* client-id takeover and a certificate used with another identity's password (the
  provisioned broker).
"""

from __future__ import annotations

import asyncio
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable

import numpy as np
import pytest

from emo_mqtt import codec
from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import Message
from emo_mqtt.bus.mqtt import MqttBus
from emo_mqtt.chunking import CHUNK_MAGIC, CHUNK_VERSION
from emo_mqtt.topics import Kind, subscription, topic

pytestmark = pytest.mark.broker

TIMEOUT_S = 30.0  # generous: a deadline here only turns a hang into a failure


async def _take(bus: MqttBus, n: int, within_s: float = TIMEOUT_S) -> list[Message]:
    """The next ``n`` whole messages of ``bus``."""
    out: list[Message] = []

    async def run() -> None:
        async for message in bus.messages():
            out.append(message)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), within_s)
    return out


async def _until(condition: Callable[[], bool], what: str, within_s: float = TIMEOUT_S) -> None:
    """Wait for a condition that no event announces (counters)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------- chunk flood


def _tiny_chunk(n: int, declared: int, offset: int = 0) -> bytes:
    """41 bytes: a chunk header of transfer ``n`` declaring ``declared`` bytes, one data byte."""
    head = struct.pack("<3sB16sQQI", CHUNK_MAGIC, CHUNK_VERSION, n.to_bytes(16, "big"),
                       declared, offset, zlib.crc32(b"\x00"))
    return head + b"\x00"


async def test_chunk_flood_costs_at_most_the_budget_and_delivery_goes_on(
    mosquitto: BrokerHandle,
) -> None:
    run = "hostile-flood"
    victim_topic = topic(Kind.DEVICE_UPDATE, run, node="dev00")
    flood_topic = topic(Kind.DEVICE_UPDATE, run, node="dev07")
    update = codec.encode({"w": np.arange(750_000, dtype=np.float32)}, kind="update")
    async with (
        MqttBus(mosquitto.url, f"{run}-server", clean_start=True) as server,
        MqttBus(mosquitto.url, f"{run}-dev00", clean_start=True) as honest,
        MqttBus(mosquitto.url, f"{run}-dev07", clean_start=True) as attacker,
    ):
        await server.subscribe(subscription(Kind.DEVICE_UPDATE, run))
        tracemalloc.start()
        try:
            for n in range(200):
                # Every 41-byte frame declares 256 MiB, each at another offset.
                await attacker.publish(flood_topic, _tiny_chunk(n, 256 * 2**20, offset=n * 4096))
                if n % 50 == 0:  # legitimate 3 MB updates (chunked) amid the flood
                    await honest.publish(victim_topic, update)
            got = await _take(server, 4)
            await _until(lambda: sum(server.stats.rejected.values()) == 200, "the flood")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Then a flood that fits the budget: 8 MiB declared each, 8 transfers at most.
        for n in range(200, 400):
            await attacker.publish(flood_topic, _tiny_chunk(n, 8 * 2**20))
        await honest.publish(victim_topic, update)
        got += await _take(server, 1)
        await _until(lambda: sum(server.stats.rejected.values()) == 392, "the second flood")
        held = server.reassembly_held_bytes
        assert server.connected and server.stats.reconnects == 0
    assert [m.topic for m in got] == [victim_topic] * 5
    assert all(m.payload == update for m in got)
    # 200 x 256 MiB declared: the bus took in the honest updates (4 x 3 MB, and their
    # decoding is not in here) and almost nothing for the flood.
    assert peak < 24 * 2**20
    assert server.stats.rejected == {"chunk_budget": 392}
    assert held == 8  # one byte in each of the 8 transfers the cap let in
