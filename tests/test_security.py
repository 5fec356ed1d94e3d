"""A fleet on a Mosquitto started with what `emo fleet provision` wrote: TLS, passwords, ACLs.

Every denial is shown against the real broker: a message that the ACLs refuse is never
delivered to a subscriber that may read its topic, while an allowed one is.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from emo_mqtt.broker.launch import find_free_port, find_mosquitto
from emo_mqtt.broker.url import BrokerURL
from emo_mqtt.bus import Message
from emo_mqtt.bus.mqtt import MqttBus
from emo_mqtt.errors import BusError
from emo_mqtt.provision import acl_text, load_node_config, provision
from emo_mqtt.topics import Kind, topic

pytestmark = pytest.mark.broker

RUN = "sec"


@dataclass
class Fleet:
    dir: Path
    port: int

    def url(self, username: str) -> BrokerURL:
        return load_node_config(self.dir / "nodes" / username / "node.json").broker


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    binary = find_mosquitto()
    assert binary is not None, "install mosquitto: apt-get install -y mosquitto"
    out = tmp_path_factory.mktemp("fleet")
    port = find_free_port()
    provision(out, 2, 1, port=port, bind="127.0.0.1")
    log = (out / "mosquitto.log").open("wb")
    proc = subprocess.Popen([str(binary), "-c", str(out / "mosquitto.conf")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (out / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the provisioned broker did not listen"
                time.sleep(0.05)
        yield Fleet(out, port)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _bus(url: BrokerURL, client: str, **kwargs: object) -> MqttBus:
    kwargs.setdefault("connect_timeout_s", 3.0)
    return MqttBus(url, client, clean_start=True, **kwargs)  # type: ignore[arg-type]


async def _received(bus: MqttBus, seconds: float) -> list[Message]:
    got: list[Message] = []

    async def drain() -> None:
        async for message in bus.messages():
            got.append(message)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(drain(), seconds)
    return got


def test_acl_file_is_least_privilege() -> None:
    acl = acl_text(4, 2, run="r1")
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n") if
              b.startswith("user ")}
    # Overlay ovl1 serves dev01 and dev03 (dealt in turn) and reads nothing else of devices.
    ovl1 = blocks["user overlay-ovl1"]
    assert [t for t in ovl1 if "/device/" in t] == [
        "topic read emo/r1/device/dev01/activations", "topic read emo/r1/device/dev03/activations"]
    dev = blocks["user device-dev02"]
    assert all("dev02" in t or t.endswith(("/server/round", "/server/done")) for t in dev)
    assert not any(t.startswith("topic write") and "/server/" in t for t in dev)
    assert all(t.startswith("topic read") for t in blocks["user monitor"])
    # Only the server writes server/* and control/*.
    writers = [u for u, lines in blocks.items() if any(
        line.startswith("topic write") and ("/server/" in line or "/control/" in line)
        for line in lines)]
    assert writers == ["user server-server"]


def test_cli_provision_writes_a_usable_fleet(tmp_path: Path) -> None:
    from emo_mqtt.cli import main

    out = tmp_path / "f"
    assert main(["fleet", "provision", "--devices", "3", "--overlays", "2", "--out", str(out),
                 "--run", "r9", "--host", "broker.example", "--port", "9883"]) == 0
    node = load_node_config(out / "nodes" / "device-dev02" / "node.json")
    assert (node.role, node.node_id, node.run) == ("device", "dev02", "r9")
    assert str(node.broker) == "mqtts://device-dev02@broker.example:9883"
    assert node.broker.password and Path(node.broker.ca_file or "").is_file()
    assert (out / "nodes" / "device-dev02" / "client.key").stat().st_mode & 0o077 == 0
    assert "device-dev02:$" in (out / "passwd").read_text()  # hashed, not plain text
    assert "topic read emo/r9/device/dev01/activations" in (out / "acl").read_text()
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "require_certificate true" in conf
    san = subprocess.run(["openssl", "x509", "-in", str(out / "broker" / "broker.crt"),
                          "-noout", "-ext", "subjectAltName"], capture_output=True,
                         text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in san and "DNS:localhost" in san
    assert "DNS:broker.example" in san
    # A second provisioning into the same directory would replace the CA: refused.
    assert main(["fleet", "provision", "--devices", "1", "--out", str(out)]) == 2


def test_refused_connections(fleet: Fleet) -> None:
    good = fleet.url("device-dev00")

    async def refused(url: BrokerURL, **kwargs: object) -> str:
        with pytest.raises(BusError) as caught:
            async with _bus(url, "intruder", connect_timeout_s=1.5, **kwargs):
                pass
        return str(caught.value)

    async def main() -> None:
        # Anonymous (a valid client certificate, no username): refused by the broker's
        # CONNACK ("not authorised"), at once, not after a timeout.
        assert "refused" in await refused(replace(good, username=None, password=None))
        assert "refused" in await refused(replace(good, password="wrong"))
        # A stolen password without the client certificate: the TLS handshake fails.
        await refused(replace(good, cert_file=None, key_file=None))
        # Plain TCP to the TLS listener.
        await refused(BrokerURL("mqtt", good.host, good.port, good.username, good.password))
        # A client that trusts another CA does not accept the broker.
        await refused(good, tls_context=ssl.create_default_context())
        # The right credentials connect.
        async with _bus(good, "dev00-ok") as bus:
            assert bus.connected

    asyncio.run(main())


def test_acl_denials_really_happen(fleet: Fleet) -> None:
    async def main() -> None:
        async with (
            _bus(fleet.url("server-server"), "srv") as server,
            _bus(fleet.url("overlay-ovl0"), "ovl") as overlay,
            _bus(fleet.url("device-dev00"), "d0") as dev0,
            _bus(fleet.url("device-dev01"), "d1") as dev1,
        ):
            await server.subscribe(f"emo/{RUN}/device/+/update")
            await overlay.subscribe(topic(Kind.DEVICE_ACTIVATIONS, RUN, node="dev01"))
            await dev0.subscribe(topic(Kind.DEVICE_ACTIVATIONS, RUN, node="dev01"))  # denied
            await dev0.subscribe(topic(Kind.SERVER_ROUND, RUN))
            await dev1.subscribe(topic(Kind.SERVER_ROUND, RUN))
            # dev00 publishes as dev01 (refused) and as itself (delivered).
            await dev0.publish(topic(Kind.DEVICE_UPDATE, RUN, node="dev01"), b"spoofed")
            await dev0.publish(topic(Kind.DEVICE_UPDATE, RUN, node="dev00"), b"own")
            # dev00 publishes a global model (refused); the server's round is delivered.
            await dev0.publish(topic(Kind.SERVER_ROUND, RUN), b"forged round", retain=False)
            await server.publish(topic(Kind.SERVER_ROUND, RUN), b"real round", retain=False)
            # dev01's activations reach its overlay, never dev00.
            await dev1.publish(topic(Kind.DEVICE_ACTIVATIONS, RUN, node="dev01"), b"acts")
            srv_got, ovl_got, d0_got, d1_got = await asyncio.gather(
                _received(server, 1.0), _received(overlay, 1.0), _received(dev0, 1.0),
                _received(dev1, 1.0))
        assert [(m.topic, bytes(m.payload)) for m in srv_got] == [
            (f"emo/{RUN}/device/dev00/update", b"own")]
        assert [bytes(m.payload) for m in d1_got] == [b"real round"]
        assert [bytes(m.payload) for m in d0_got] == [b"real round"]  # no activations of dev01
        assert [bytes(m.payload) for m in ovl_got] == [b"acts"]

    asyncio.run(main())





def test_full_run_over_tls_with_provisioned_nodes(
    fleet: Fleet, tmp_path: Path, tiny_scenario: Callable[[str], Path]
) -> None:
    scenario = tiny_scenario("secure")
    nodes = fleet.dir / "nodes"
    procs: list[subprocess.Popen[str]] = []
    try:
        # Both runs at once, on the same broker, each with its own run id.
        for algorithm in ("fl", "emo"):
            common = ["--run", f"{RUN}-{algorithm}", "--config", str(scenario),
                      "--algorithm", algorithm]
            members = [("device", "device-dev00"), ("device", "device-dev01"),
                       ("server", "server-server")]
            if algorithm == "emo":
                members.append(("overlay", "overlay-ovl0"))
            for role, user in members:
                extra = ["--out", str(tmp_path / algorithm)] if role == "server" else []
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "emo_mqtt.cli", "node", role,
                     "--node-config", str(nodes / user / "node.json"), *common, *extra],
                    stderr=subprocess.PIPE, text=True))
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            proc.kill()
    for algorithm in ("fl", "emo"):
        meta = json.loads((tmp_path / algorithm / algorithm / "server.json").read_text())
        assert meta["run"] == f"{RUN}-{algorithm}"
        assert [h["round"] for h in meta["history"]] == [1, 2]
        assert all(h["updates"] == 2 for h in meta["history"])

def test_monitor_reads_status_and_metrics_only(fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                                               ) -> None:
    # A dashboard gets its TLS files from the environment and its login from the URL.
    files = fleet.dir / "nodes" / "monitor"
    monkeypatch.setenv("EMO_MQTT_CA", str(files / "ca.crt"))
    monkeypatch.setenv("EMO_MQTT_CERT", str(files / "client.crt"))
    monkeypatch.setenv("EMO_MQTT_KEY", str(files / "client.key"))
    login = fleet.url("monitor")
    url = f"mqtts://monitor:{login.password}@127.0.0.1:{fleet.port}"

    async def main() -> None:
        async with (
            MqttBus(url, "dash", clean_start=True) as monitor,
            _bus(fleet.url("device-dev00"), "d0m") as dev0,
        ):
            for topic_filter in ("emo/+/status/#", "emo/+/metrics/#"):
                await monitor.subscribe(topic_filter)
            await dev0.subscribe(topic(Kind.SERVER_ROUND, RUN))
            await monitor.publish(topic(Kind.SERVER_ROUND, RUN), b"from monitor")  # denied
            await dev0.publish(topic(Kind.METRICS, RUN, node="dev00", role="device"), b"{}")
            mon_got, d0_got = await asyncio.gather(_received(monitor, 1.0),
                                                   _received(dev0, 1.0))
        # (Retained statuses of earlier runs on this broker arrive too: status is readable.)
        assert all("/status/" in m.topic for m in mon_got if m.retain)
        assert [m.topic for m in mon_got if not m.retain] == [f"emo/{RUN}/metrics/device/dev00"]
        assert d0_got == []

    asyncio.run(main())
