"""The shaping proxy: pure scheduling, then sockets, then a real Mosquitto behind it.

Timings use wide tolerances: the test machine is shared and noisy, and what matters is that
a shaped link is slower by about the amount asked, not the exact figure.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import open_bus
from emo_mqtt.errors import ConfigError
from emo_mqtt.linkmodel import DelaySchedule, LinkSpec, TokenBucket
from emo_mqtt.shaping import ShapingProxy

MB = 1_000_000

# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bandwidth_bps": 0}, "bandwidth_bps"),
        ({"bandwidth_bps": float("inf")}, "bandwidth_bps"),
        ({"latency_s": -1}, "latency_s"),
        ({"jitter_s": float("nan")}, "jitter_s"),
        ({"loss": 1.5}, "loss"),
        ({"rto_s": -0.1}, "rto_s"),
        ({"jitter": "pareto"}, "jitter"),
    ],
)
def test_linkspec_rejects_bad_values_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        LinkSpec(**kwargs)  # type: ignore[arg-type]


def test_token_bucket_bursts_then_paces() -> None:
    bucket = TokenBucket(rate=1000.0, burst=500, now=0.0)
    assert bucket.reserve(500, 0.0) == 0.0  # the burst goes at once
    assert bucket.reserve(1000, 0.0) == pytest.approx(1.0)  # then 1000 bytes at 1000 B/s
    assert bucket.reserve(500, 0.0) == pytest.approx(1.5)  # queued behind the debt
    # Idle time refills, but never beyond the burst.
    assert bucket.reserve(500, 100.0) == 100.0
    assert bucket.reserve(100, 100.0) == pytest.approx(100.1)


def test_token_bucket_rate_change_and_unlimited() -> None:
    bucket = TokenBucket(rate=None, burst=10)
    assert bucket.reserve(10**9, 5.0) == 5.0
    bucket.set_rate(100.0, 5.0)
    assert bucket.reserve(110, 5.0) == pytest.approx(6.0)


def test_delay_schedule_never_reorders_and_is_seeded() -> None:
    spec = LinkSpec(latency_s=0.05, jitter_s=0.04, jitter="normal", loss=0.2, rto_s=0.2)
    a, b = DelaySchedule(random.Random(7)), DelaySchedule(random.Random(7))
    times = [a.release(i * 0.001, spec) for i in range(500)]
    assert times == [b.release(i * 0.001, spec) for i in range(500)]
    assert times == sorted(times)
    assert all(t >= i * 0.001 for i, t in enumerate(times))
    # Some chunks paid a retransmission timeout: the largest gap is at least one RTO.
    assert max(y - x for x, y in itertools.pairwise(times)) >= 0.15


def test_delay_schedule_uniform_jitter_stays_in_range() -> None:
    spec = LinkSpec(latency_s=0.1, jitter_s=0.02)
    sched = DelaySchedule(random.Random(1))
    delays = [sched.delay(spec) for _ in range(1000)]
    assert all(0.08 <= d <= 0.12 for d in delays)
    assert 0.095 < sum(delays) / len(delays) < 0.105


# ------------------------------------------------------------------ sockets


async def _sink_server() -> tuple[asyncio.Server, int]:
    """A server that echoes pings and answers a whole stream with its length at EOF."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        total = 0
        try:
            while data := await r.read(65536):
                total += len(data)
                if data.startswith(b"ping"):
                    w.write(data)
                    await w.drain()
            w.write(f"{total}\n".encode())
            await w.drain()
        except (OSError, asyncio.CancelledError):
            pass  # the proxy cut us off, or the test ended: both expected here
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def test_uplink_bandwidth_paces_a_1mb_transfer() -> None:
    server, port = await _sink_server()
    proxy = ShapingProxy(
        "127.0.0.1", port, uplink=LinkSpec(bandwidth_bps=500_000), downlink=LinkSpec()
    )
    async with server, proxy:
        r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
        start = time.monotonic()
        w.write(b"x" * (MB - 1) + b"\n")
        w.write_eof()
        assert int(await r.readline()) == MB
        elapsed = time.monotonic() - start
        w.close()
    assert 1.6 <= elapsed <= 3.0, elapsed
    assert proxy.stats.bytes_up == MB and proxy.stats.connections == 1


async def test_latency_adds_a_round_trip_per_ping() -> None:
    server, port = await _sink_server()
    link = LinkSpec(latency_s=0.05)
    proxy = ShapingProxy("127.0.0.1", port, uplink=link, downlink=link)
    async with server, proxy:
        r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
        start = time.monotonic()
        for i in range(5):
            w.write(f"ping {i}\n".encode())
            assert await r.readline() == f"ping {i}\n".encode()
        elapsed = time.monotonic() - start
        w.close()
    assert 0.45 <= elapsed <= 1.0, elapsed  # 5 round trips of 2 x 50 ms


async def test_offline_proxy_refuses_connections_until_back_online() -> None:
    server, port = await _sink_server()
    proxy = ShapingProxy("127.0.0.1", port)
    async with server, proxy:
        r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
        w.write(b"ping\n")
        assert await r.readline() == b"ping\n"  # the relay is up, not still connecting
        proxy.set_online(False)
        assert await r.read(10) == b""  # the open connection is cut
        w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.set_online(True)
        await asyncio.sleep(0.05)
        r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
        w.write(b"ping\n")
        assert await r.readline() == b"ping\n"
        w.close()
    assert proxy.stats.outages == 1 and proxy.stats.connections == 2


# ------------------------------------------------------------------ a real Mosquitto


async def _publish_1mb(broker_url: str, via: str, topic: str) -> float:
    """Seconds from publishing 1 MB through ``via`` to a direct subscriber having it."""
    async with open_bus(broker_url, f"sub-{topic}") as sub, open_bus(via, f"pub-{topic}") as pub:
        await sub.subscribe(topic)
        start = time.monotonic()
        await pub.publish(topic, b"p" * MB)
        async for message in sub.messages():
            assert len(message.payload) == MB
            return time.monotonic() - start
    raise AssertionError("no message")


@pytest.mark.broker
async def test_bus_publish_through_shaped_uplink_is_slower_by_the_amount_asked(
    mosquitto: BrokerHandle,
) -> None:
    plain = ShapingProxy(mosquitto.host, mosquitto.port)
    shaped = ShapingProxy(
        mosquitto.host, mosquitto.port, uplink=LinkSpec(bandwidth_bps=500_000, latency_s=0.02)
    )
    async with plain, shaped:
        base = await _publish_1mb(mosquitto.url, plain.url, "shaping/plain")
        slow = await _publish_1mb(mosquitto.url, shaped.url, "shaping/slow")
    # 1 MB (plus MQTT and envelope overhead) at 500 kB/s: about 2 s more than unshaped.
    assert 1.5 <= slow - base <= 3.5, (base, slow)
    assert shaped.stats.bytes_up > MB


@pytest.mark.broker
async def test_outage_reconnects_the_bus_and_loses_no_qos1_message(
    mosquitto: BrokerHandle,
) -> None:
    proxy = ShapingProxy(
        mosquitto.host,
        mosquitto.port,
        uplink=LinkSpec(latency_s=0.01),
        downlink=LinkSpec(latency_s=0.01),
    )
    async with (
        proxy,
        open_bus(mosquitto.url, "outage-sub") as sub,
        open_bus(proxy.url, "outage-pub") as pub,
    ):
        await sub.subscribe("shaping/outage")
        await pub.publish("shaping/outage", b"before")
        proxy.set_online(False)
        await asyncio.sleep(0.2)
        assert not pub.connected
        publishing = asyncio.create_task(pub.publish("shaping/outage", b"during"))
        await asyncio.sleep(1.5)
        assert not publishing.done()  # it waits for the link, it does not fail
        proxy.set_online(True)
        await asyncio.wait_for(publishing, 15)
        got: list[bytes] = []
        async for message in sub.messages():
            got.append(bytes(message.payload))
            if message.payload == b"during":
                break
        assert got == [b"before", b"during"]
        assert pub.stats.reconnects >= 1
        assert proxy.stats.outages == 1 and proxy.stats.connections >= 2


async def _latency_behind_bulk(mosquitto: BrokerHandle, background: bool) -> tuple[float, float]:
    """(seconds a 1 kB message took, seconds the 1.5 MB bulk message took) when the small
    one is published 0.2 s into the bulk one, over a 500 kB/s uplink."""
    proxy = ShapingProxy(
        mosquitto.host, mosquitto.port, uplink=LinkSpec(bandwidth_bps=500_000, latency_s=0.01)
    )
    tag = "bg" if background else "fg"
    async with proxy, open_bus(proxy.url, f"bulk-{tag}", clean_start=True) as pub:
        began = time.monotonic()
        bulk = asyncio.create_task(
            pub.publish(f"shaping/{tag}/bulk", b"b" * 1_500_000, background=background)
        )
        await asyncio.sleep(0.2)
        small_began = time.monotonic()
        await pub.publish(f"shaping/{tag}/small", b"s" * 1000)
        small = time.monotonic() - small_began
        await bulk
        return small, time.monotonic() - began


@pytest.mark.broker
async def test_a_background_publish_lets_other_messages_through_first(
    mosquitto: BrokerHandle,
) -> None:
    """EMO's activations go in the background so that FL updates do not queue behind them.

    In the foreground, the 1.5 MB message goes as two 0.75 MB frames and the small message
    waits behind the first (~1.5 s at 500 kB/s; the last frame of a message waits for the
    others' acknowledgements, see MqttBus._publish_frames, so it does not wait for both);
    in the background, it waits behind at most two 64 KiB frames (~0.26 s). The bulk
    message takes about as long either way.
    """
    fg_small, fg_bulk = await _latency_behind_bulk(mosquitto, background=False)
    bg_small, bg_bulk = await _latency_behind_bulk(mosquitto, background=True)
    assert fg_small > 1.0, fg_small
    assert bg_small < 0.8, bg_small
    assert bg_bulk < fg_bulk * 1.5, (bg_bulk, fg_bulk)
