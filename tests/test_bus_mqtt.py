"""The MQTT bus against real brokers: what tests/test_bus_memory.py proves in memory, over TCP.

Every test starts from the broker fixtures of conftest.py (never the system Mosquitto) and
uses its own topics and client ids, so the session broker's persistent sessions and
retained messages of one test never reach another.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import struct
import time

import aiomqtt
import numpy as np
import pytest
from conftest import take_messages, until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from emo_mqtt import codec
from emo_mqtt.bench import bare_run, emo_bus_run
from emo_mqtt.broker.launch import BrokerHandle, find_free_port
from emo_mqtt.broker.url import parse_broker_url
from emo_mqtt.bus import BusOptions, Message
from emo_mqtt.bus.fastpath import ZERO_COPY_MIN
from emo_mqtt.bus.mqtt import MqttBus
from emo_mqtt.chunking import HEADER_SIZE, split
from emo_mqtt.errors import BusError, CodecError, PublishTimeout

pytestmark = pytest.mark.broker

TIMEOUT_S = 30.0  # generous: a deadline here only turns a hang into a failure


@pytest.fixture(autouse=True, params=["fast", "plain"])
def client_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the bus's fast client and with its fallback on aiomqtt's
    public API (emo_mqtt/bus/fastpath.py), unless it picks one itself."""
    monkeypatch.setenv("EMO_MQTT_PLAIN", "1" if request.param == "plain" else "0")
    kind: str = request.param
    return kind


def _sever(bus: MqttBus) -> None:
    """Cut the bus's TCP connection as a crash or a network failure would: no DISCONNECT."""
    assert bus.connected
    bus.sever()


def _start(broker: BrokerHandle) -> None:
    """Start a stopped broker from the main thread, blocking the loop for a few ms.

    Only a broker started from the main thread gets the parent-death signal
    (broker/launch.py): one started from a worker thread outlives a killed test run.
    """
    broker.start()


def _tensor_frame(nbytes: int, seed: int = 0) -> tuple[np.ndarray, bytes]:
    tensor = np.random.default_rng(seed).standard_normal(nbytes // 4, dtype=np.float32)
    return tensor, codec.encode({"tensor": tensor}, kind="test", sender="pub", seq=seed)


# ----------------------------------------------------------------- payloads and counters


async def test_small_and_chunked_messages_arrive_bit_exact(mosquitto: BrokerHandle) -> None:
    tensor, big = _tensor_frame(5_000_000, seed=1)
    pub = MqttBus(mosquitto.url, "payload-pub", clean_start=True)
    sub = MqttBus(mosquitto.url, "payload-sub", clean_start=True)
    async with pub, sub:
        await sub.subscribe("emo/payload/#")
        await pub.publish("emo/payload/small", b"hello")
        await pub.publish("emo/payload/big", big)
        got = {m.topic: m for m in await take_messages(sub, 2)}
        # A retained message is one MQTT message: a chunked one is refused before sending.
        with pytest.raises(BusError, match="retained payload of 5000"):
            await pub.publish("emo/payload/retained", big, retain=True)

    assert got["emo/payload/small"].payload == b"hello"
    assert got["emo/payload/big"].payload == big
    envelope = codec.decode(got["emo/payload/big"].payload)
    assert envelope.seq == 1
    assert envelope.body["tensor"].dtype == np.float32
    assert np.array_equal(envelope.body["tensor"], tensor)

    chunks = math.ceil(len(big) / (pub.options.chunk_size - HEADER_SIZE))
    assert chunks == 5  # 1 MiB frames
    frames = 1 + chunks
    wire = len(b"hello") + len(big) + chunks * HEADER_SIZE
    assert pub.stats.published_messages == 2  # the refused retained publish counts nothing
    assert pub.stats.published_frames == frames
    assert pub.stats.published_bytes == wire
    assert pub.stats.bytes_out_by_topic == {
        "emo/payload/small": 5,
        "emo/payload/big": wire - 5,
    }
    assert sub.stats.received_messages == 2
    assert sub.stats.received_frames == frames
    assert sub.stats.received_bytes == wire
    assert pub.stats.republished_frames == 0
    assert not sub.stats.rejected
    assert sub.reassembly_pending_bytes == 0


async def test_fast_paths_carry_every_kind_of_publish(mosquitto: BrokerHandle) -> None:
    # The paho replacements (a large payload sent without a copy, a received one handed
    # over in place) serve both ends, and every shape of PUBLISH goes through them intact.
    big = os.urandom(3 * ZERO_COPY_MIN)  # unchunked, yet past the zero-copy threshold
    pub = MqttBus(mosquitto.url, "fast-pub", clean_start=True, plain=False)
    sub = MqttBus(mosquitto.url, "fast-sub", clean_start=True, plain=False)
    async with pub, sub:
        assert pub.connected and sub.connected
        assert not pub.plain and not sub.plain
        await sub.subscribe("emo/fast/#", qos=1)
        await pub.publish("emo/fast/q0-small", b"tiny", qos=0)
        await pub.publish("emo/fast/q0-big", big, qos=0)
        await pub.publish("emo/fast/q1-big", big, qos=1)
        # MQTT 5 properties, which the bus never sends itself, from a plain aiomqtt client.
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [("who", "raw")]
        properties.MessageExpiryInterval = 60
        target = parse_broker_url(mosquitto.url)
        async with aiomqtt.Client(
            target.host, target.port, identifier="fast-raw", protocol=aiomqtt.ProtocolVersion.V5
        ) as raw:
            await raw.publish("emo/fast/props", big, qos=1, properties=properties)
        got = {m.topic: m for m in await take_messages(sub, 4)}
        assert pub.pending_acks == 0  # every acknowledgement was collected
    assert got["emo/fast/q0-small"].payload == b"tiny"
    for name, qos in (("q0-big", 0), ("q1-big", 1), ("props", 1)):
        message = got[f"emo/fast/{name}"]
        assert message.payload == big and message.qos == qos
        assert type(message.payload) is bytearray  # paho's own packet buffer, not a copy
    assert not sub.stats.rejected


# ----------------------------------------------------------------- protocol versions


async def test_mosquitto_negotiates_mqtt5(mosquitto: BrokerHandle) -> None:
    async with MqttBus(mosquitto.url, "proto-5", clean_start=True) as bus:
        assert bus.negotiated == "5"
    # Asked for 3.1.1, Mosquitto speaks it too.
    async with MqttBus(mosquitto.url, "proto-311", clean_start=True, protocol="3.1.1") as bus:
        await bus.subscribe("emo/proto/#")
        await bus.publish("emo/proto/x", b"v3")
        (got,) = await take_messages(bus, 1)
        assert bus.negotiated == "3.1.1"
    assert got.payload == b"v3"


async def test_amqtt_falls_back_to_311_and_carries_chunks(amqtt_broker: BrokerHandle) -> None:
    _, big = _tensor_frame(3_000_000, seed=2)
    pub = MqttBus(amqtt_broker.url, "fallback-pub", clean_start=True)
    sub = MqttBus(amqtt_broker.url, "fallback-sub", clean_start=True)
    try:
        # amqtt leaves an MQTT 5 CONNECT unanswered: each bus waits out its probe, at once.
        await asyncio.gather(pub.connect(), sub.connect())
        assert (pub.negotiated, sub.negotiated) == ("3.1.1", "3.1.1")
        await sub.subscribe("emo/fallback/#")
        await pub.publish("emo/fallback/big", big)
        await pub.publish("emo/fallback/small", b"after")
        got = await take_messages(sub, 2)
    finally:
        await pub.close()
        await sub.close()
    assert [m.payload for m in got] == [big, b"after"]
    chunk = BusOptions().chunk_size - HEADER_SIZE
    assert pub.stats.published_frames == 1 + math.ceil(len(big) / chunk)
    assert not sub.stats.rejected


# ----------------------------------------------------------------- last will


async def test_last_will_on_abrupt_disconnect_not_on_clean_close(mosquitto: BrokerHandle) -> None:
    url = mosquitto.url
    async with MqttBus(url, "will-watcher", clean_start=True) as watcher:
        await watcher.subscribe("emo/will/status/#")

        clean_will = Message("emo/will/status/clean", b"clean-offline", 1, True)
        clean = MqttBus(url, "will-clean", clean_start=True, will=clean_will)
        await clean.connect()
        await clean.close()

        crash_will = Message("emo/will/status/crash", b"crash-offline", 1, True)
        crash = MqttBus(url, "will-crash", clean_start=True, will=crash_will, reconnect_max_s=0.5)
        await crash.connect()
        try:
            _sever(crash)
            # The clean close came first: had it left a will, that would arrive first.
            (will,) = await take_messages(watcher, 1)
            assert (will.topic, will.payload) == ("emo/will/status/crash", b"crash-offline")
            # The bus that lost its connection comes back by itself.
            await until(lambda: crash.connected and crash.stats.reconnects >= 1, "reconnect")
        finally:
            await crash.close()  # clean: no second will
        await watcher.publish("emo/will/status/marker", b"marker")
        (marker,) = await take_messages(watcher, 1)
        assert marker.payload == b"marker"

    # The will was retained: a subscriber that comes later still learns the node died.
    async with MqttBus(url, "will-late", clean_start=True) as late:
        await late.subscribe("emo/will/status/#")
        (retained,) = await take_messages(late, 1)
        assert (retained.topic, retained.payload, retained.retain) == (
            "emo/will/status/crash",
            b"crash-offline",
            True,
        )
        await late.publish("emo/will/status/crash", b"", retain=True)  # clear it


# ----------------------------------------------------------------- reconnects and sessions


async def _collect(bus: MqttBus, into: list[bytes]) -> None:
    async for message in bus.messages():
        into.append(bytes(message.payload))


async def test_broker_restart_loses_no_qos1_message(fresh_mosquitto: BrokerHandle) -> None:
    url = fresh_mosquitto.url
    where = "emo/restart/data"
    sub = MqttBus(url, "restart-sub", reconnect_max_s=0.5)  # persistent: clean_start=False
    pub = MqttBus(url, "restart-pub", reconnect_max_s=0.5)
    received: list[bytes] = []
    async with sub, pub:
        assert (sub.clean_start, pub.clean_start) == (False, False)
        await sub.subscribe("emo/restart/#")
        consumer = asyncio.create_task(_collect(sub, received))
        try:
            before = [f"before-{i}".encode() for i in range(20)]
            for payload in before:
                await pub.publish(where, payload)
            await until(lambda: set(before) <= set(received), "the messages sent before")

            # Outage. SIGTERM: Mosquitto saves its sessions and queues, then exits.
            await asyncio.to_thread(fresh_mosquitto.stop)
            await until(lambda: not pub.connected and not sub.connected, "both to notice")
            during = [f"during-{i}".encode() for i in range(20)]
            waiting = [asyncio.create_task(pub.publish(where, p)) for p in during]
            done, _ = await asyncio.wait(waiting, timeout=0.2)
            assert not done, "a publish returned while the broker was down"
            _start(fresh_mosquitto)
            await asyncio.gather(*waiting)  # they went out on the new connection
            assert pub.stats.reconnects >= 1
            # The subscriber may still be in its backoff: let it come back before the next cut.
            await until(lambda: sub.connected and sub.stats.reconnects >= 1, "sub to reconnect")

            # restart() with publishes in flight: some PUBACKs are lost with the connection.
            after: list[bytes] = []
            restarted = asyncio.Event()

            async def stream() -> None:  # one publish after another until 50 past the restart
                extra = 0
                while extra < 50:
                    payload = f"after-{len(after)}".encode()
                    await pub.publish(where, payload)
                    after.append(payload)
                    extra += restarted.is_set()

            streaming = asyncio.create_task(stream())
            await until(lambda: len(after) >= 50, "the stream to flow")
            # restart(), in its two halves: the stream goes on while the broker stops.
            await asyncio.to_thread(fresh_mosquitto.stop)
            _start(fresh_mosquitto)
            restarted.set()
            await asyncio.wait_for(streaming, TIMEOUT_S)

            want = set(before) | set(during) | set(after)
            await until(lambda: want <= set(received), "every message to arrive")
            await until(lambda: sub.stats.reconnects >= 2, "sub to renew its subscription")
        finally:
            consumer.cancel()

    assert set(received) == want  # nothing lost, nothing foreign
    duplicates = len(received) - len(want)  # at-least-once: allowed, and counted
    print(
        f"restart: {len(want)} messages, {duplicates} duplicates, "
        f"{pub.stats.republished_frames} frames republished"
    )
    assert pub.stats.reconnects >= 2
    assert sub.stats.reconnects >= 2
    assert pub.negotiated == sub.negotiated == "5"
    assert not sub.stats.rejected


async def test_subscription_is_renewed_when_the_broker_forgot_it(
    fresh_mosquitto: BrokerHandle,
) -> None:
    url = fresh_mosquitto.url
    sub = MqttBus(url, "renew-sub", reconnect_max_s=0.5)
    pub = MqttBus(url, "renew-pub", reconnect_max_s=0.5)
    async with sub, pub:
        await sub.subscribe("emo/renew/#")
        await pub.publish("emo/renew/x", b"one")
        (first,) = await take_messages(sub, 1)
        # SIGKILL before any autosave: the restarted broker knows no session at all.
        assert fresh_mosquitto.workdir is not None
        assert not (fresh_mosquitto.workdir / "data" / "mosquitto.db").exists()
        await asyncio.to_thread(fresh_mosquitto.kill)
        _start(fresh_mosquitto)
        # reconnects counts a connection once its subscriptions are renewed.
        await until(
            lambda: sub.connected and sub.stats.reconnects >= 1 and pub.connected,
            "both to reconnect",
        )
        await pub.publish("emo/renew/x", b"two")
        (second,) = await take_messages(sub, 1)
    assert (first.payload, second.payload) == (b"one", b"two")


# A small frame takes paho's own send path; a large one the zero-copy one (and, with the
# broker stopped, fills the socket: the bus then waits for it to drain).
@pytest.mark.parametrize("payload", [b"payload", b"payload" * 100_000], ids=["small", "large"])
async def test_frame_in_flight_when_the_connection_drops_is_published_again(
    fresh_mosquitto: BrokerHandle, payload: bytes
) -> None:
    url = fresh_mosquitto.url
    sub = MqttBus(url, "inflight-sub", reconnect_max_s=0.5)
    pub = MqttBus(url, "inflight-pub", reconnect_max_s=0.5)
    async with sub, pub:
        await sub.subscribe("emo/inflight/#")
        pid = fresh_mosquitto.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the broker reads nothing and acknowledges nothing
        try:
            publishing = asyncio.create_task(pub.publish("emo/inflight/x", payload))
            for _ in range(20):  # let the frame go out; its PUBACK cannot come
                await asyncio.sleep(0)
            assert not publishing.done()
            _sever(pub)
            await until(lambda: not pub.connected, "the publisher to notice")
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(publishing, TIMEOUT_S)  # republished on the next connection
        assert pub.stats.republished_frames >= 1
        assert pub.stats.reconnects >= 1
        await pub.publish("emo/inflight/x", b"marker")
        got: list[bytes] = []
        while not got or got[-1] != b"marker":
            got += [bytes(m.payload) for m in await take_messages(sub, 1)]
    # Once or twice (if the broker read the first copy before the connection's end).
    assert got[-1] == b"marker"
    assert got[:-1] in ([payload], [payload, payload])


@pytest.mark.timeout(20)  # a regression spins the event loop: only a signal can end it
async def test_publish_just_after_a_connection_loss_waits_for_the_next_one(
    mosquitto: BrokerHandle,
) -> None:
    pub = MqttBus(mosquitto.url, "justlost-pub", clean_start=True, reconnect_max_s=0.5)
    sub = MqttBus(mosquitto.url, "justlost-sub", clean_start=True)
    async with pub, sub:
        await sub.subscribe("emo/justlost/#")
        _sever(pub)
        # One loop iteration at a time, to look before the supervisor's callbacks have run.
        while pub.connected:  # noqa: ASYNC110
            await asyncio.sleep(0)
        # The connection is gone but its supervisor has not run yet: the race's window.
        assert pub.reconnecting
        await pub.publish("emo/justlost/x", b"after the loss")
        (got,) = await take_messages(sub, 1)
        assert pub.stats.reconnects >= 1
    assert got.payload == b"after the loss"


async def test_offline_persistent_subscriber_gets_what_it_missed(mosquitto: BrokerHandle) -> None:
    url = mosquitto.url
    async with MqttBus(url, "offline-sub") as sub:  # clean_start=False, session expiry 1 h
        await sub.subscribe("emo/offline/#")
    _, big = _tensor_frame(2_500_000, seed=3)
    sent = [b"m0", b"m1", big, b"m3"]
    async with MqttBus(url, "offline-pub", clean_start=True) as pub:
        for payload in sent:
            await pub.publish("emo/offline/x", payload)
    again = MqttBus(url, "offline-sub")
    async with again:
        got = await take_messages(again, len(sent))
        assert not again.subscriptions  # the broker's session held the subscription
    assert [m.payload for m in got] == sent
    # Leave no session behind on the shared broker.
    async with MqttBus(url, "offline-sub", clean_start=True):
        pass


# ----------------------------------------------------------------- backpressure


async def test_slow_subscriber_with_tiny_inbox_loses_nothing(mosquitto: BrokerHandle) -> None:
    n, size = 300, 64 * 1024  # 19.7 MB: more than the socket buffers hold
    pub = MqttBus(mosquitto.url, "slow-pub", clean_start=True)
    sub = MqttBus(
        mosquitto.url, "slow-sub", clean_start=True, options=BusOptions(inbox_max_frames=4)
    )
    async with pub, sub:
        await sub.subscribe("emo/slow/#")
        for i in range(n):
            await pub.publish("emo/slow/n", struct.pack("<I", i) * (size // 4))
        # Nobody has read yet: the bus stopped reading its socket at 4 frames.
        await until(lambda: sub.stats.pauses >= 1, "the reader to pause")
        assert sub.inbox_size <= 4
        order: list[int] = []
        peak = 0
        async for message in sub.messages():
            peak = max(peak, sub.inbox_size)
            (index,) = struct.unpack_from("<I", message.payload)
            assert message.payload == struct.pack("<I", index) * (size // 4)
            order.append(index)
            if len(order) == n:
                break
            if len(order) % 50 == 0:  # busy elsewhere until the inbox is full again
                await until(lambda: sub.reading_paused, "the reader to pause again")
        assert sub.connected
    assert order == list(range(n))
    assert peak <= 4
    assert sub.stats.pauses >= 1 + (n - 1) // 50  # paused, resumed, paused again...
    assert sub.stats.received_frames == n
    assert sub.stats.reconnects == 0
    assert not sub.stats.rejected


# ----------------------------------------------------------------- bad input


async def test_garbage_is_rejected_and_delivery_goes_on(mosquitto: BrokerHandle) -> None:
    frames = split(b"y" * 5000, chunk_size=1000)
    corrupt = bytearray(frames[1])
    corrupt[-1] ^= 0xFF  # checksum mismatch
    bad_version = bytearray(frames[0])
    bad_version[3] = 99
    huge = bytearray(frames[0])
    huge[20:28] = struct.pack("<Q", 2**40)  # claims a 1 TB transfer
    bad_chunks = [
        b"EMC\x01",  # magic and version, no header
        bytes(frames[0][:20]),  # truncated header
        bytes(corrupt),
        bytes(bad_version),
        bytes(huge),
    ]
    raw = b"\x00\xffnot a chunk, nor a codec frame"
    _, big = _tensor_frame(2_000_000, seed=4)
    pub = MqttBus(mosquitto.url, "garbage-pub", clean_start=True)
    sub = MqttBus(mosquitto.url, "garbage-sub", clean_start=True)
    async with pub, sub:
        await sub.subscribe("emo/garbage/#")
        for frame in bad_chunks:
            await pub.publish("emo/garbage/x", frame)  # small: goes out as it is
        await pub.publish("emo/garbage/x", raw)
        await pub.publish("emo/garbage/x", big)
        await pub.publish("emo/garbage/x", b"after")
        got = await take_messages(sub, 3)
        assert sub.connected
    # The bus rejects bad chunk frames; other payloads are whole messages to it, and
    # decoding them is the node's business.
    assert [m.payload for m in got] == [raw, big, b"after"]
    with pytest.raises(CodecError):
        codec.decode(got[0].payload)
    assert sub.stats.rejected == {"bad_chunk": len(bad_chunks)}
    assert sub.stats.received_messages == 3
    assert sub.reassembly_pending_bytes == 0


# ----------------------------------------------------------------- failures


async def test_connect_failure_is_a_bus_error_within_the_timeout() -> None:
    port = find_free_port()  # nothing listens there
    bus = MqttBus(f"mqtt://127.0.0.1:{port}", "nobody-home", connect_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(BusError) as info:
        await bus.connect()
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert 0.4 < elapsed < 3.0  # it retries until the deadline, then gives up
    assert f"could not connect to mqtt://127.0.0.1:{port} within 0.5 s" in message
    assert "Connection refused" in message
    assert not bus.connected
    with pytest.raises(BusError, match="closed"):
        await bus.publish("emo/nobody/x", b"1")


async def test_publish_timeout(mosquitto: BrokerHandle) -> None:
    pub = MqttBus(mosquitto.url, "timeout-pub", clean_start=True)
    sub = MqttBus(mosquitto.url, "timeout-sub", clean_start=True)
    async with pub, sub:
        await sub.subscribe("emo/timeout/#")
        with pytest.raises(PublishTimeout, match="not acknowledged within 1e-06 s") as info:
            await pub.publish("emo/timeout/big", b"x" * 5_000_000, timeout=0.000001)
        assert isinstance(info.value, BusError) and isinstance(info.value, TimeoutError)
        assert pub.stats.published_messages == 0
        # The bus is still usable. Frames handed to the client before the deadline still go
        # out, so the big message may arrive all the same (a timeout is no retraction).
        await pub.publish("emo/timeout/small", b"still alive")
        got: list[Message] = []
        while not got or got[-1].payload != b"still alive":
            got += await take_messages(sub, 1)
    assert all(m.payload == b"x" * 5_000_000 for m in got[:-1])
    assert not sub.stats.rejected


# ----------------------------------------------------------------- the benchmark path


async def test_bench_runs_move_every_payload(mosquitto: BrokerHandle) -> None:
    # Correctness only: benchmarks never gate tests on speed.
    ours = await emo_bus_run(mosquitto.url, 200_000, 5, run="test-bench")
    assert (ours.messages, ours.payload_bytes) == (5, 1_000_000)
    assert 1_000_000 < ours.wire_bytes < 1_010_000  # the codec envelope, unchunked
    assert ours.elapsed_s > 0
    chunked = await emo_bus_run(mosquitto.url, 200_000, 5, chunk_size=65536, run="test-bench")
    tensor = np.zeros(50_000, np.float32)
    frame = len(codec.encode({"tensor": tensor}, kind="bench", sender="test-bench-pub", seq=0))
    chunks = math.ceil(frame / (65536 - HEADER_SIZE))
    assert chunked.wire_bytes == 5 * (frame + chunks * HEADER_SIZE)
    bare = await bare_run(mosquitto.url, 200_000, 5, run="test-bench")
    assert (bare.messages, bare.payload_bytes, bare.wire_bytes) == (5, 1_000_000, 1_000_000)
    assert bare.elapsed_s > 0
