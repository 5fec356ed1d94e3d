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
import json
import struct
import time
import tracemalloc
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from conftest import Fleet, take_messages, until

from emo_mqtt import codec
from emo_mqtt.broker.launch import BrokerHandle, find_free_port
from emo_mqtt.broker.url import BrokerURL
from emo_mqtt.bus.mqtt import MqttBus
from emo_mqtt.chunking import CHUNK_MAGIC, CHUNK_VERSION
from emo_mqtt.dashboard.server import serve_dashboard
from emo_mqtt.fleet import Monitor
from emo_mqtt.topics import Kind, subscription, topic

pytestmark = pytest.mark.broker

TIMEOUT_S = 30.0  # generous: a deadline here only turns a hang into a failure


# ----------------------------------------------------------------- chunk flood


def _tiny_chunk(n: int, declared: int, offset: int = 0) -> bytes:
    """41 bytes: a chunk header of transfer ``n`` declaring ``declared`` bytes, one data byte."""
    head = struct.pack(
        "<3sB16sQQI",
        CHUNK_MAGIC,
        CHUNK_VERSION,
        n.to_bytes(16, "big"),
        declared,
        offset,
        zlib.crc32(b"\x00"),
    )
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
            got = await take_messages(server, 4)
            await until(lambda: sum(server.stats.rejected.values()) == 200, "the flood")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Then a flood that fits the budget: 8 MiB declared each, 8 transfers at most.
        for n in range(200, 400):
            await attacker.publish(flood_topic, _tiny_chunk(n, 8 * 2**20))
        await honest.publish(victim_topic, update)
        got += await take_messages(server, 1)
        await until(lambda: sum(server.stats.rejected.values()) == 392, "the second flood")
        held = server.reassembly_held_bytes
        assert server.connected and server.stats.reconnects == 0
    assert [m.topic for m in got] == [victim_topic] * 5
    assert all(m.payload == update for m in got)
    # 200 x 256 MiB declared: the bus took in the honest updates (4 x 3 MB, and their
    # decoding is not in here) and almost nothing for the flood.
    assert peak < 24 * 2**20
    assert server.stats.rejected == {"chunk_budget": 392}
    assert held == 8  # one byte in each of the 8 transfers the cap let in


# ----------------------------------------------------------------- telemetry not ours

#: What a device may put, retained, on its own status and metrics topics.
BAD_TELEMETRY: dict[str, bytes] = {
    "too_deep": b"[" * 5000 + b"]" * 5000,
    "not_object": b"[1]",
    "bad_json": b'{"state": "online", "round": ',
    "bad_field": json.dumps(
        {"state": "online", "round": "three", "bytes_out": -1, "rejected": {"x": "many"}}
    ).encode(),
}


async def _plant(bus: MqttBus, run: str, device: str) -> None:
    """Retain each bad payload on a status and a metrics topic of its own device."""
    for n, payload in enumerate(BAD_TELEMETRY.values()):
        node = f"{device}{n}"
        for kind in (Kind.STATUS, Kind.METRICS):
            await bus.publish(topic(kind, run, node=node, role="device"), payload, retain=True)


async def _clear(bus: MqttBus, run: str, device: str) -> None:
    for n in range(len(BAD_TELEMETRY)):
        for kind in (Kind.STATUS, Kind.METRICS):
            await bus.publish(
                topic(kind, run, node=f"{device}{n}", role="device"), b"", retain=True
            )


def _server_metrics(run: str, **body: object) -> tuple[str, bytes]:
    return topic(Kind.METRICS, run, node="server", role="server"), json.dumps(body).encode()


async def test_monitor_skips_and_counts_telemetry_that_is_not_ours(
    mosquitto: BrokerHandle,
) -> None:
    run = "hostile-monitor"
    said: list[str] = []
    monitor = Monitor(mosquitto.url, run, "fl", 1, said.append)
    async with MqttBus(mosquitto.url, f"{run}-dev77", clean_start=True) as attacker:
        await _plant(attacker, run, "dev7")  # retained before the monitor even starts
        await monitor.start()
        try:
            # A device forging the server's events on its own metrics topic.
            await attacker.publish(
                topic(Kind.METRICS, run, node="dev77", role="device"),
                json.dumps(
                    {
                        "event": "done",
                        "accuracy": 1.0,
                        "fl_accuracy": 1.0,
                        "fl_model_sha256": "forged",
                    }
                ).encode(),
            )
            async with MqttBus(mosquitto.url, f"{run}-server", clean_start=True) as server:
                round_ = {
                    "event": "round",
                    "round": 1,
                    "accuracy": 0.5,
                    "fl_accuracy": 0.5,
                    "updates": 2,
                    "wall_s": 1.0,
                    "bytes_out": 100,
                }
                await server.publish(*_server_metrics(run, **round_))
                await server.publish(*_server_metrics(run, event="round", round=2))  # no acc
                await server.publish(
                    *_server_metrics(
                        run,
                        event="done",
                        accuracy=0.5,
                        fl_accuracy=0.5,
                        final=True,
                        fl_model_sha256="abc",
                        bytes_out=200,
                        rejected={"duplicate": 1},
                    )
                )
                await until(lambda: monitor.done is not None, "the server's done event")
            await until(lambda: sum(monitor.skipped.values()) == 6, "every bad message")
        finally:
            await monitor.close()
            await _clear(attacker, run, "dev7")
    assert monitor.skipped == {
        "too_deep": 1,
        "not_object": 1,
        "bad_json": 1,
        "bad_field": 1,
        "not_server": 1,
        "missing_field": 1,
    }
    assert monitor.done is not None and monitor.done["fl_model_sha256"] == "abc"
    assert [h["round"] for h in monitor.history] == [1]
    assert monitor.bytes_so_far() == 200
    assert monitor.bus.stats.rejected == {"bad_metrics": 6}
    assert any("round   1/1" in line for line in said)


async def _api_state(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    state: dict[str, Any] = json.loads(body)
    return state


async def test_dashboard_survives_retained_bad_telemetry_and_counts_it(
    mosquitto: BrokerHandle,
) -> None:
    run = "hostile-dash"
    async with MqttBus(mosquitto.url, f"{run}-dev77", clean_start=True) as attacker:
        await _plant(attacker, run, "dev7")
        await attacker.publish(
            topic(Kind.STATUS, run, node="dev00", role="device"),
            json.dumps({"state": "online", "round": 1}).encode(),
            retain=True,
        )
        try:
            # Twice: `emo dashboard` restarted finds the same retained messages again.
            for _ in range(2):
                port = find_free_port()
                stop, ready = asyncio.Event(), asyncio.Event()
                task = asyncio.create_task(
                    serve_dashboard(mosquitto.url, "127.0.0.1", port, ready=ready, stop=stop)
                )
                await asyncio.wait_for(ready.wait(), TIMEOUT_S)
                deadline = time.monotonic() + TIMEOUT_S
                while True:
                    state = await _api_state(port)
                    if (
                        state["malformed_by_reason"].get("bad_field", 0) >= 2
                        and run in state["runs"]
                    ):
                        break
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.05)
                assert not task.done()
                stop.set()
                await asyncio.wait_for(task, TIMEOUT_S)
                # Retained: 4 bad payloads on a status and a metrics topic each.
                assert state["malformed_by_reason"] == {
                    "bad_field": 2,
                    "bad_json": 2,
                    "not_object": 2,
                    "too_deep": 2,
                }
                assert state["runs"][run]["online"] == {"device": 1}
        finally:
            await _clear(attacker, run, "dev7")
            await attacker.publish(
                topic(Kind.STATUS, run, node="dev00", role="device"), b"", retain=True
            )


# ----------------------------------------------------------------- provisioned identities


def _tls_bus(url: BrokerURL, client: str, clean_start: bool = True) -> MqttBus:
    return MqttBus(url, client, clean_start=clean_start, connect_timeout_s=5.0)


async def test_client_id_takeover_is_refused(fleet: Fleet) -> None:
    """dev01 connects with the server's client id: under the provisioned conf the broker
    uses dev01's username as its client id, so neither the server's connection nor its
    queued QoS 1 messages are touched."""
    run = "hostile-takeover"
    victim_id = f"{run}-server-server"  # what the server sends as its client id
    updates = topic(Kind.DEVICE_UPDATE, run, node="dev00")
    server = _tls_bus(fleet.url("server-server"), victim_id, clean_start=False)
    async with server:
        await server.subscribe(updates)
    # The server is away; dev00's updates queue in its persistent session.
    async with _tls_bus(fleet.url("device-dev00"), f"{run}-device-dev00") as dev00:
        await dev00.publish(updates, b"update 1")
        await dev00.publish(updates, b"update 2")
        # The attacker, with its own credentials, takes the victim's client id, with a
        # clean start that would wipe the victim's session.
        async with _tls_bus(fleet.url("device-dev01"), victim_id, clean_start=True) as evil:
            assert evil.connected
            await evil.publish(topic(Kind.DEVICE_UPDATE, run, node="dev01"), b"mine")
        server = _tls_bus(fleet.url("server-server"), victim_id, clean_start=False)
        async with server:
            queued = await take_messages(server, 2)
            # And while the server is connected, the attacker cannot kick it off.
            async with _tls_bus(fleet.url("device-dev01"), victim_id) as evil:
                assert evil.connected
                await dev00.publish(updates, b"update 3")
                queued += await take_messages(server, 1)
            assert server.connected and server.stats.reconnects == 0
    assert [bytes(m.payload) for m in queued] == [b"update 1", b"update 2", b"update 3"]


async def test_a_certificate_acts_only_as_its_own_identity(fleet: Fleet) -> None:
    """dev01's certificate with dev00's username and password logs in as dev01, never
    dev00: dev00's topics stay closed to it, and the real dev00 is not disturbed."""
    run = "hostile-identity"
    dev00_url, dev01_url = fleet.url("device-dev00"), fleet.url("device-dev01")
    mixed = replace(dev00_url, cert_file=dev01_url.cert_file, key_file=dev01_url.key_file)
    assert mixed.username == "device-dev00" and mixed.password == dev00_url.password
    async with (
        _tls_bus(fleet.url("server-server"), f"{run}-server") as server,
        _tls_bus(dev00_url, f"{run}-device-dev00") as dev00,
    ):
        await server.subscribe(subscription(Kind.DEVICE_UPDATE, run))
        async with _tls_bus(mixed, f"{run}-impostor") as impostor:
            await impostor.publish(topic(Kind.DEVICE_UPDATE, run, node="dev00"), b"as dev00")
            await impostor.publish(topic(Kind.DEVICE_UPDATE, run, node="dev01"), b"as dev01")
            (got,) = await take_messages(server, 1)
        await dev00.publish(topic(Kind.DEVICE_UPDATE, run, node="dev00"), b"real dev00")
        (real,) = await take_messages(server, 1)
        assert dev00.connected and dev00.stats.reconnects == 0
    # The publish as dev00 was dropped by the ACLs: the broker took the connection for
    # dev01 (the certificate's CN), whose update arrived.
    assert (got.topic, bytes(got.payload)) == (
        topic(Kind.DEVICE_UPDATE, run, node="dev01"),
        b"as dev01",
    )
    assert bytes(real.payload) == b"real dev00"
