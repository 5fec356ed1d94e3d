"""The bus's use of private aiomqtt/paho members (emo_mqtt/bus/fastpath.py) and its fallback.

The first test is the alarm for upgrades: it fails, listing every difference, when a new
release of aiomqtt or paho-mqtt renames, removes or re-signs a private member the fast
client relies on. The others prove that the check can fail, that the bus then falls back
to aiomqtt's public API and still works, and what the fallback and the fast client share
(the last chunk of a message waits for the others' acknowledgements).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest

from emo_mqtt.bench import bare_run, emo_bus_run, reference_frame_size
from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import BusOptions, fastpath
from emo_mqtt.bus import mqtt as bus_mqtt
from emo_mqtt.bus.mqtt import MqttBus, fast_paths_problems
from emo_mqtt.chunking import parse_frame

TIMEOUT_S = 30.0


async def test_private_members_match_the_installed_releases() -> None:
    # If this fails after an upgrade: read the new release's code for each member listed,
    # adapt emo_mqtt/bus/fastpath.py and its MEMBERS, or pin the old release. Meanwhile
    # the bus runs on aiomqtt's public API (and says so in a warning).
    assert fast_paths_problems() == []


class _Paho:
    _sock = None

    def _handle_publish(self) -> None: ...


class _Aiomqtt:
    _loop = _disconnected = _pending_publishes = None

    def __init__(self) -> None:
        self._client = _Paho()

    def _on_message(self, message: Any) -> None: ...  # lost its client, userdata params


def test_problems_names_each_difference() -> None:
    found = fastpath.problems(_Aiomqtt(), "3.0.0")
    assert "aiomqtt 3.0.0 is not a 2.x release" in found
    assert any(
        p.startswith("aiomqtt.Client._on_message('self', 'message') differs") for p in found
    ), found
    assert "aiomqtt.Client._on_socket_open is missing" in found
    assert "paho.Client._send_publish is missing" in found
    assert "paho.Client._sock is missing" not in found  # present: not reported
    assert "paho.Client._handle_publish is missing" not in found


@pytest.mark.broker
async def test_bus_falls_back_to_the_public_api_when_members_differ(
    mosquitto: BrokerHandle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bus_mqtt, "fast_paths_problems", lambda: ["paho.Client._x is missing"])
    monkeypatch.delenv("EMO_MQTT_PLAIN", raising=False)
    big = os.urandom(3_000_000)  # three chunks
    pub = MqttBus(mosquitto.url, "fallback-pub", clean_start=True)
    sub = MqttBus(mosquitto.url, "fallback-sub", clean_start=True)
    with caplog.at_level(logging.WARNING, logger="emo_mqtt.bus.mqtt"):
        async with pub, sub:
            assert pub.plain and sub.plain
            await sub.subscribe("emo/fallback-plain/#")
            await pub.publish("emo/fallback-plain/big", big)
            await pub.publish("emo/fallback-plain/small", b"after", qos=0)
            it = sub.messages()
            got = [await asyncio.wait_for(anext(it), TIMEOUT_S) for _ in range(2)]
    assert [m.payload for m in got] == [big, b"after"]
    assert "paho.Client._x is missing" in caplog.text
    assert "public API only" in caplog.text


@pytest.mark.broker
@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
async def test_environment_selects_the_client(
    mosquitto: BrokerHandle, monkeypatch: pytest.MonkeyPatch, plain: bool
) -> None:
    monkeypatch.setenv("EMO_MQTT_PLAIN", "1" if plain else "0")
    async with MqttBus(mosquitto.url, f"env-{plain}", clean_start=True) as bus:
        assert bus.plain is plain


@pytest.mark.broker
@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
async def test_last_chunk_waits_for_the_others_acknowledgements(
    mosquitto: BrokerHandle, plain: bool
) -> None:
    # Against a broker with Nagle's algorithm on, the message's last PUBACK would wait for
    # a delayed ACK: the last frame goes only once every other frame is acknowledged, so
    # that it carries that ACK (docs/performance.md). Events, not timings, are checked.
    options = BusOptions(chunk_size=1040)  # 1000 bytes of data per frame: six frames
    pub = MqttBus(
        mosquitto.url, f"lastchunk-{plain}", clean_start=True, plain=plain, options=options
    )
    events: list[tuple[str, int]] = []
    original = pub._publish_chunk

    async def traced(topic: str, chunk: bytearray, qos: int) -> None:
        offset = parse_frame(chunk)[0].offset
        events.append(("sent", offset))
        await original(topic, chunk, qos)
        events.append(("acked", offset))

    pub._publish_chunk = traced  # type: ignore[method-assign]
    async with pub:
        await pub.publish("emo/lastchunk/x", os.urandom(6000))
    frames = {index for _, index in events}
    assert len(frames) == 6
    last = events.index(("sent", max(frames)))
    acked_before = {index for kind, index in events[:last] if kind == "acked"}
    assert acked_before == frames - {max(frames)}
    # ... while the others did overlap: all of them were sent before the first ack.
    first_ack = next(i for i, (kind, _) in enumerate(events) if kind == "acked")
    assert {index for kind, index in events[:first_ack] if kind == "sent"} == acked_before


@pytest.mark.broker
async def test_bench_reference_uses_frames_a_capped_broker_takes(mosquitto: BrokerHandle) -> None:
    # The session broker caps packets at 2 MiB + 64 KiB (broker/mosquitto.conf).
    assert await reference_frame_size(mosquitto.url, 3_000_000, 1_048_576) == 1_048_576
    assert await reference_frame_size(mosquitto.url, 1_000_000, 1_048_576) is None
    bare = await bare_run(mosquitto.url, 3_000_000, 2, run="capped", frame_size=1_048_576)
    assert (bare.messages, bare.payload_bytes) == (2, 6_000_000)
    plain = await emo_bus_run(mosquitto.url, 3_000_000, 2, run="capped", plain=True)
    assert (plain.messages, plain.payload_bytes) == (2, 6_000_000)
