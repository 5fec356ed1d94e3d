"""The broker launcher, its Mosquitto config, and broker URLs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from emo_mqtt.broker import launch
from emo_mqtt.broker.launch import BrokerHandle, find_free_port, render_config, run_foreground
from emo_mqtt.broker.url import BrokerURL, parse_broker_url
from emo_mqtt.errors import BrokerError, ConfigError

pytestmark = pytest.mark.broker

MiB = 1 << 20
V5 = aiomqtt.ProtocolVersion.V5
V311 = aiomqtt.ProtocolVersion.V311


def client(
    broker: BrokerHandle,
    ident: str,
    protocol: aiomqtt.ProtocolVersion = V5,
    persistent: bool = False,
) -> aiomqtt.Client:
    """An aiomqtt client; ``persistent`` asks for a session that outlives the connection."""
    if protocol == V5:
        props = None
        if persistent:  # MQTT 5: clean_start=False alone ends the session at disconnect
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        return aiomqtt.Client(
            broker.host, broker.port, identifier=ident, protocol=V5,
            clean_start=not persistent, properties=props, timeout=5,
        )  # fmt: skip
    return aiomqtt.Client(
        broker.host, broker.port, identifier=ident, protocol=V311,
        clean_session=not persistent, timeout=5,
    )  # fmt: skip


async def next_message(c: aiomqtt.Client, within: float = 5.0) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(aiter(c.messages)), within)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # a zombie still answers: gone means started, stopped AND reaped
    except ProcessLookupError:
        return True
    return False


# ------------------------------------------------------------------------- URLs
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local:1884", BrokerURL("mqtt", "broker.local", 1884)),
        ("mqtt://broker", BrokerURL("mqtt", "broker", 1883)),
        ("mqtts://broker", BrokerURL("mqtts", "broker", 8883)),
        ("mqtts://broker:9999", BrokerURL("mqtts", "broker", 9999)),
        ("mqtt://user:p%40ss@10.0.0.2:1883", BrokerURL("mqtt", "10.0.0.2", 1883, "user", "p@ss")),
        ("mqtt://[::1]:1884", BrokerURL("mqtt", "::1", 1884)),
        ("MQTT://Broker/", BrokerURL("mqtt", "Broker", 1883)),
        # Other spellings users bring from paho, Grafana and mosquitto_sub.
        ("tcp://broker:1884", BrokerURL("mqtt", "broker", 1884)),
        ("ssl://broker", BrokerURL("mqtts", "broker", 8883)),
        ("tls://broker:8884", BrokerURL("mqtts", "broker", 8884)),
        ("localhost:1883", BrokerURL("mqtt", "localhost", 1883)),
        ("broker", BrokerURL("mqtt", "broker", 1883)),
        ("[::1]:1884", BrokerURL("mqtt", "::1", 1884)),
    ],
)
def test_parse_good_urls(url: str, expected: BrokerURL) -> None:
    parsed = parse_broker_url(url)
    assert parsed == expected
    assert parsed.password == expected.password  # not part of repr, still compared


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("broker/x:1883", "missing scheme"),
        ("1884", "a port alone"),
        ("http://broker", "unsupported scheme"),
        ("ws://broker:9001", "unsupported scheme"),
        ("mqtt://", "empty host"),
        ("mqtt://:1883", "empty host"),
        ("mqtt://broker:", "empty port"),
        ("mqtt://broker:0", "out of range"),
        ("mqtt://broker:65536", "out of range"),
        ("mqtt://broker:port", "not a number"),
        ("mqtt://broker:-1", "not a number"),
        ("mqtt://::1:1884", "brackets"),
        ("mqtt://[::1", "IPv6"),
        ("mqtt://[not-v6]:1", "address"),
        ("mqtt://bro ker", "whitespace"),
        ("mqtt://broker:18\n83", "whitespace"),
        ("mqtt://broker/topic", "path"),
        ("mqtt://broker?x=1", "query"),
        ("mqtt://under_score", "host name"),
        ("mqtt://300.1.1.1", "IPv4"),
        ("mqtt://@broker", "user name"),
    ],
)
def test_parse_bad_urls(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_broker_url(url)


def test_url_renders_without_password() -> None:
    url = parse_broker_url("mqtt://alice:secret@[::1]:1884")
    assert str(url) == "mqtt://alice@[::1]:1884"
    assert "secret" not in repr(url)
    assert parse_broker_url(str(url)) == BrokerURL("mqtt", "::1", 1884, "alice")
    assert str(parse_broker_url("mqtts://h")) == "mqtts://h:8883"


# ------------------------------------------------------------- ports and config
def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    assert 1024 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_render_config_fills_every_placeholder(tmp_path: Path) -> None:
    text = render_config(41234, "127.0.0.1", tmp_path)
    assert "listener 41234 127.0.0.1" in text
    assert f"persistence_location {tmp_path.resolve()}\n" in text
    assert "max_packet_size 2162688" in text
    assert "{" not in text and "}" not in text
    with pytest.raises(ConfigError, match="spaces"):
        render_config(41234, "127.0.0.1", tmp_path / "with space")
    with pytest.raises(ConfigError, match="out of range"):
        render_config(0, "127.0.0.1", tmp_path)


# -------------------------------------------------------------------- Mosquitto
def test_mosquitto_fixture_describes_itself(mosquitto: BrokerHandle) -> None:
    assert mosquitto.kind == "mosquitto" and mosquitto.is_running()
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto.port != 1883  # never the system broker
    assert f"on 127.0.0.1:{mosquitto.port} (started by emo, pid {mosquitto.pid})" in (
        mosquitto.describe()
    )
    assert mosquitto.describe().startswith("Mosquitto 2.")


def test_auto_prefers_mosquitto() -> None:
    assert BrokerHandle().kind == "mosquitto"  # the binary is installed here
    assert BrokerHandle(kind="amqtt").kind == "amqtt"
    with pytest.raises(ConfigError):
        BrokerHandle(kind="rabbitmq")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="whitespace"):
        BrokerHandle(host="bad host")
    with pytest.raises(ConfigError, match="out of range"):
        BrokerHandle(port=70000)
    with pytest.raises(BrokerError, match="cannot listen"):
        BrokerHandle(host="192.0.2.1")  # TEST-NET-1: not an address of this machine


async def test_mosquitto_round_trip_1mib_qos1_v5(mosquitto: BrokerHandle) -> None:
    payload = os.urandom(MiB)
    async with client(mosquitto, "rt-sub") as sub, client(mosquitto, "rt-pub") as pub:
        await sub.subscribe("emo/test/rt", qos=1)
        await pub.publish("emo/test/rt", payload, qos=1)
        msg = await next_message(sub)
    assert msg.payload == payload and msg.qos == 1


async def test_mosquitto_accepts_2mib_payload(mosquitto: BrokerHandle) -> None:
    # The cap is max_packet_size = 2 MiB + 64 KiB of headroom: a 2 MiB payload still fits.
    payload = os.urandom(2 * MiB)
    async with client(mosquitto, "2m-sub") as sub, client(mosquitto, "2m-pub") as pub:
        await sub.subscribe("emo/test/2m", qos=1)
        await pub.publish("emo/test/2m", payload, qos=1)
        assert (await next_message(sub)).payload == payload


async def test_mosquitto_drops_3mib_publish_and_its_publisher(mosquitto: BrokerHandle) -> None:
    async with client(mosquitto, "big-sub") as sub, client(mosquitto, "big-pub") as pub:
        await sub.subscribe("emo/test/big", qos=1)
        # Mosquitto closes the connection (MQTT 5: DISCONNECT 0x95 "Packet too large", when
        # it wins the race with the RST, see test_oversize_publish_seen_by_paho) and
        # never sends the PUBACK. aiomqtt does not fail the pending publish on disconnect:
        # the caller only sees its own timeout, then "not connected" errors.
        with pytest.raises(aiomqtt.MqttError, match="timed out"):
            await pub.publish("emo/test/big", b"x" * (3 * MiB), qos=1, timeout=0.5)
        with pytest.raises(aiomqtt.MqttCodeError):
            await pub.publish("emo/test/big", b"small", qos=1, timeout=0.5)
        with pytest.raises(TimeoutError):  # and nothing was forwarded
            await next_message(sub, within=0.2)
    assert mosquitto.log_path is not None
    assert "big-pub disconnected due to oversize packet" in mosquitto.log_path.read_text()


@pytest.mark.parametrize(
    ("protocol", "expected_reasons"),
    [(MQTTProtocolVersion.MQTTv5, {0x95, 0x80}), (MQTTProtocolVersion.MQTTv311, {0x80})],
    ids=["v5", "v311"],
)
def test_oversize_publish_seen_by_paho(
    mosquitto: BrokerHandle, protocol: MQTTProtocolVersion, expected_reasons: set[int]
) -> None:
    # v5 clients learn the cap from CONNACK. Over the cap, Mosquitto sends v5 clients
    # DISCONNECT 0x95 "Packet too large" and closes; but it closes with most of our 3 MiB
    # unread, so the kernel often answers with a RST that discards the DISCONNECT before
    # paho reads it: then paho reports 0x80 "Unspecified error", as for v3.1.1 clients,
    # which get no DISCONNECT at all. Do not rely on seeing 0x95.
    seen: dict[str, object] = {}
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"paho-big-{protocol.value}", protocol=protocol
    )
    c.on_connect = lambda _c, _u, _f, rc, props: seen.update(connack=rc, props=props)
    c.on_disconnect = lambda _c, _u, _f, rc, _p: seen.update(reason=rc.value)
    c.connect(mosquitto.host, mosquitto.port)
    # Drive the network loop by hand: loop_start()'s thread would sleep through paho's
    # reconnect delay before it noticed loop_stop().
    deadline = time.monotonic() + 5
    while "connack" not in seen and time.monotonic() < deadline:
        c.loop(0.01)
    c.publish("emo/test/paho-big", b"x" * (3 * MiB), qos=1)
    while "reason" not in seen and time.monotonic() < deadline:
        c.loop(0.01)
    assert seen["reason"] in expected_reasons
    if protocol == MQTTProtocolVersion.MQTTv5:
        assert seen["props"].MaximumPacketSize == 2162688  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocol", [V5, V311], ids=["v5", "v311"])
async def test_restart_keeps_persistent_session(
    fresh_mosquitto: BrokerHandle, protocol: aiomqtt.ProtocolVersion
) -> None:
    broker = fresh_mosquitto
    async with client(broker, "overlay-1", protocol, persistent=True) as c:
        await c.subscribe("emo/test/persist", qos=1)
    async with client(broker, "device-1", protocol) as pub:
        await pub.publish("emo/test/persist", b"queued while offline", qos=1)
    port, pid = broker.port, broker.pid
    broker.restart()
    assert broker.port == port and broker.pid != pid and broker.is_running()
    assert pid is not None and process_gone(pid)
    async with client(broker, "overlay-1", protocol, persistent=True) as c:
        msg = await next_message(c)
    assert msg.payload == b"queued while offline" and msg.qos == 1
    assert broker.log_path is not None
    assert "Saving in-memory database" in broker.log_path.read_text()  # SIGTERM flushed


async def test_kill_loses_what_was_not_saved(fresh_mosquitto: BrokerHandle) -> None:
    broker = fresh_mosquitto
    async with client(broker, "overlay-2", V311, persistent=True) as c:
        await c.subscribe("emo/test/crash", qos=1)
    async with client(broker, "device-2", V311) as pub:
        await pub.publish("emo/test/crash", b"lost in the crash", qos=1)
    pid = broker.pid
    broker.kill()  # SIGKILL: no save; autosave_interval (60 s) has not elapsed
    assert pid is not None and process_gone(pid) and not broker.is_running()
    broker.start()
    async with client(broker, "overlay-2", V311, persistent=True) as c:
        with pytest.raises(TimeoutError):
            await next_message(c, within=0.3)


def test_stop_leaves_no_process_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), BrokerHandle(kind="mosquitto") as broker:
        pid, workdir = broker.pid, broker.workdir
        raise RuntimeError("boom")
    assert pid is not None and process_gone(pid)
    assert workdir is not None and not workdir.exists()  # our own tempdir is removed
    assert not broker.is_running() and broker.pid is None
    broker.stop()  # idempotent

    kept = BrokerHandle(kind="mosquitto", workdir=tmp_path / "kept")
    with kept, pytest.raises(BrokerError, match="already running"):
        kept.start()
    assert (tmp_path / "kept" / "mosquitto.log").exists()  # a workdir we were given stays


def test_bad_config_raises_with_log_tail(tmp_path: Path) -> None:
    template = tmp_path / "broken.conf"
    template.write_text(launch.CONFIG_TEMPLATE.read_text() + "\nno_such_option 1\n")
    broker = BrokerHandle(kind="mosquitto", workdir=tmp_path / "run", config=template)
    with pytest.raises(BrokerError, match=r"exited with code \d+ during start-up") as err:
        broker.start()
    assert "no_such_option" in str(err.value) or "Unknown configuration" in str(err.value)
    assert not broker.is_running()


def test_port_in_use_raises_with_log_tail() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        for kind in ("mosquitto", "amqtt"):
            with (
                pytest.raises(BrokerError, match="Address already in use"),
                BrokerHandle(kind=kind, port=port),
            ):
                pass


def test_run_foreground_forwards_sigterm() -> None:
    port = find_free_port()
    code = (
        f"import sys; from emo_mqtt.broker.launch import run_foreground as r; sys.exit(r({port}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        assert launch.wait_until(lambda: launch.port_open("127.0.0.1", port), 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # Mosquitto exits 0 on SIGTERM, and we return its code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None and b"terminating" in proc.stderr.read()
    assert not launch.port_open("127.0.0.1", port)


def test_run_foreground_without_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        run_foreground(find_free_port())
    with pytest.raises(BrokerError, match="apt-get install"):
        BrokerHandle(kind="mosquitto")
    assert BrokerHandle(kind="auto").kind == "amqtt"


# ------------------------------------------------------------------------ amqtt
async def test_amqtt_round_trip_1mib_qos1_v311(amqtt_broker: BrokerHandle) -> None:
    assert amqtt_broker.kind == "amqtt" and amqtt_broker.pid is None
    assert "MQTT 3.1.1 only" in amqtt_broker.describe()
    payload = os.urandom(MiB)
    async with (
        client(amqtt_broker, "am-sub", V311) as sub,
        client(amqtt_broker, "am-pub", V311) as pub,
    ):
        await sub.subscribe("emo/test/amqtt", qos=1)
        await pub.publish("emo/test/amqtt", payload, qos=1)
        msg = await next_message(sub)
    assert msg.payload == payload and msg.qos == 1


async def test_amqtt_refuses_mqtt5(amqtt_broker: BrokerHandle) -> None:
    # amqtt answers a v5 CONNECT with a 3.1.1 CONNACK, return code 1 ("unacceptable
    # protocol version"), and closes; paho maps it to reason 0x84, which the bus can
    # take as its cue to fall back to 3.1.1.
    with pytest.raises(MqttConnectError) as err:
        async with client(amqtt_broker, "am-v5", V5):
            pass
    assert err.value.rc == 0x84


def test_amqtt_stop_and_restart(amqtt_broker: BrokerHandle) -> None:
    port = amqtt_broker.port
    amqtt_broker.restart()
    assert amqtt_broker.is_running() and amqtt_broker.port == port
    assert launch.port_open("127.0.0.1", port)
    amqtt_broker.stop()
    assert not amqtt_broker.is_running() and not launch.port_open("127.0.0.1", port)
    assert not any(t.name == f"emo-amqtt-{port}" for t in threading.enumerate())
