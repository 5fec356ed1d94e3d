"""A fleet on a Mosquitto started with what `emo fleet provision` wrote: TLS, passwords, ACLs.

Every denial is shown against the real broker: a message that the ACLs refuse is never
delivered to a subscriber that may read its topic, while an allowed one is.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import Fleet, provisioned_brokers

from emo_mqtt.broker.launch import find_free_port, port_open
from emo_mqtt.broker.url import BrokerURL
from emo_mqtt.bus import Message
from emo_mqtt.bus.mqtt import MqttBus
from emo_mqtt.errors import BusError, ConfigError
from emo_mqtt.provision import acl_text, load_node_config, provision
from emo_mqtt.topics import Kind, telemetry_filter, topic

pytestmark = pytest.mark.broker

RUN = "sec"


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
    blocks = {
        b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n") if b.startswith("user ")
    }
    # Overlay ovl1 serves dev01 and dev03 (dealt in turn) and reads nothing else of devices.
    ovl1 = blocks["user overlay-ovl1"]
    assert [t for t in ovl1 if "/device/" in t] == [
        "topic read emo/r1/device/dev01/activations",
        "topic read emo/r1/device/dev03/activations",
    ]
    dev = blocks["user device-dev02"]
    assert all("dev02" in t or t.endswith(("/server/round", "/server/done")) for t in dev)
    assert not any(t.startswith("topic write") and "/server/" in t for t in dev)
    assert blocks["user monitor"] == ["topic read emo/+/telemetry/#"]
    # Only the server writes the run state.
    assert [u for u, lines in blocks.items() if "topic write emo/r1/telemetry/run" in lines] == [
        "user server-server"
    ]
    # Only the server writes server/* and control/*.
    writers = [
        u
        for u, lines in blocks.items()
        if any(
            line.startswith("topic write") and ("/server/" in line or "/control/" in line)
            for line in lines
        )
    ]
    assert writers == ["user server-server"]


def test_cli_provision_writes_a_usable_fleet(tmp_path: Path) -> None:
    from emo_mqtt.cli import main

    out = tmp_path / "f"
    assert (
        main(
            [
                "fleet",
                "provision",
                "--devices",
                "3",
                "--overlays",
                "2",
                "--out",
                str(out),
                "--run",
                "r9",
                "--host",
                "broker.example",
                "--port",
                "9883",
            ]
        )
        == 0
    )
    node = load_node_config(out / "nodes" / "device-dev02" / "node.json")
    assert (node.role, node.node_id, node.run) == ("device", "dev02", "r9")
    assert str(node.broker) == "mqtts://device-dev02@broker.example:9883"
    assert node.broker.password and Path(node.broker.ca_file or "").is_file()
    assert (out / "nodes" / "device-dev02" / "client.key").stat().st_mode & 0o077 == 0
    assert "device-dev02:$" in (out / "passwd").read_text()  # hashed, not plain text
    assert "topic read emo/r9/device/dev01/activations" in (out / "acl").read_text()
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "require_certificate true" in conf
    san = subprocess.run(
        [
            "openssl",
            "x509",
            "-in",
            str(out / "broker" / "broker.crt"),
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in san and "DNS:localhost" in san
    assert "DNS:broker.example" in san
    # A second provisioning into the same directory would replace the CA: refused.
    assert main(["fleet", "provision", "--devices", "1", "--out", str(out)]) == 2


def test_provisioned_conf_binds_identities_and_never_runs_as_root(tmp_path: Path) -> None:
    out = tmp_path / "f"
    summary = provision(out, 1, 0)
    lines = (out / "mosquitto.conf").read_text().splitlines()
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
    ):
        assert line in lines
    users = [line for line in lines if line.startswith("user ")]
    assert users == [f"user {summary['broker_user']}"] and users != ["user root"]
    if os.geteuid() == 0:
        mosquitto = pwd.getpwnam("mosquitto")
        assert users == ["user mosquitto"]
        for path in ("passwd", "acl", "broker/broker.key", "data"):
            st = (out / path).stat()
            assert (st.st_uid, st.st_gid) == (mosquitto.pw_uid, mosquitto.pw_gid), path
        # pytest's base directory is private (0700): provisioning says the broker's user
        # cannot reach the files there.
        assert "cannot enter" in str(summary["warning"])
    # Private keys and the node directories stay the provisioning user's.
    assert (out / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    assert (out / "nodes").stat().st_mode & 0o077 == 0
    assert (out / "passwd").stat().st_mode & 0o077 == 0
    assert not list(out.glob(".passwd-*"))


@pytest.mark.parametrize(
    "fake",
    [
        "exit 3",  # the tool fails
        "exit 0",  # the tool claims success but hashes nothing
    ],
)
def test_password_hashing_that_fails_fails_provisioning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "mosquitto_passwd"
    tool.write_text(f"#!/bin/sh\necho 'mosquitto_passwd: broken' >&2\n{fake}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "f"
    with pytest.raises(ConfigError, match="hash"):
        provision(out, 1, 0)
    # No password file at all, and no plain-text leftover.
    assert not (out / "passwd").exists() and not list(out.glob(".passwd-*"))
    secret = json.loads((out / "nodes" / "device-dev00" / "node.json").read_text())["password"]
    assert not any(secret in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())


def _forged_cert(where: Path, cn: str) -> tuple[Path, Path]:
    """A client certificate for ``cn`` from a CA the fleet never heard of."""
    key, crt = where / f"{cn}.key", where / f"{cn}.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "1",
            "-subj",
            f"/CN={cn}",
        ],
        capture_output=True,
        check=True,
    )
    return key, crt


def test_refused_connections(fleet: Fleet, tmp_path: Path) -> None:
    good = fleet.url("device-dev00")
    key, crt = _forged_cert(tmp_path, "server-server")

    async def refused(url: BrokerURL, **kwargs: object) -> str:
        with pytest.raises(BusError) as caught:
            async with _bus(url, "intruder", connect_timeout_s=1.5, **kwargs):
                pass
        return str(caught.value)

    async def main() -> None:
        # A stolen password without the client certificate: the TLS handshake fails.
        await refused(replace(good, cert_file=None, key_file=None))
        # A certificate naming the server, from another CA: the TLS handshake fails.
        server = fleet.url("server-server")
        await refused(replace(server, cert_file=str(crt), key_file=str(key)))
        # Plain TCP to the TLS listener.
        await refused(BrokerURL("mqtt", good.host, good.port, good.username, good.password))
        # A client that trusts another CA does not accept the broker.
        await refused(good, tls_context=ssl.create_default_context())
        # The right credentials connect; the certificate alone is the login (its CN is the
        # username: see tests/test_hostile.py for what that binds).
        async with _bus(good, "dev00-ok") as bus:
            assert bus.connected
        async with _bus(replace(good, username=None, password=None), "dev00-cert") as bus:
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
                _received(server, 1.0),
                _received(overlay, 1.0),
                _received(dev0, 1.0),
                _received(dev1, 1.0),
            )
        assert [(m.topic, bytes(m.payload)) for m in srv_got] == [
            (f"emo/{RUN}/device/dev00/update", b"own")
        ]
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
        # One run after the other, each with its own run id: an identity is one connection
        # at a time (the broker takes the certificate's CN as the client id).
        for algorithm in ("fl", "emo"):
            common = [
                "--run",
                f"{RUN}-{algorithm}",
                "--config",
                str(scenario),
                "--algorithm",
                algorithm,
            ]
            members = [
                ("device", "device-dev00"),
                ("device", "device-dev01"),
                ("server", "server-server"),
            ]
            if algorithm == "emo":
                members.append(("overlay", "overlay-ovl0"))
            for role, user in members:
                extra = ["--out", str(tmp_path / algorithm)] if role == "server" else []
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "emo_mqtt.cli",
                            "node",
                            role,
                            "--node-config",
                            str(nodes / user / "node.json"),
                            *common,
                            *extra,
                        ],
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
            for proc in procs[-len(members) :]:
                _, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, err
                # No node was ever kicked off by another connection of its identity.
                assert "lost" not in err, err
    finally:
        for proc in procs:
            proc.kill()
    for algorithm in ("fl", "emo"):
        meta = json.loads((tmp_path / algorithm / algorithm / "server.json").read_text())
        assert meta["run"] == f"{RUN}-{algorithm}"
        assert [h["round"] for h in meta["history"]] == [1, 2]
        assert all(h["updates"] == 2 for h in meta["history"])


def test_monitor_reads_status_and_metrics_only(
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
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
            await monitor.subscribe(telemetry_filter())
            await monitor.subscribe("emo/+/status/#")  # the old layout: nothing there
            await dev0.subscribe(topic(Kind.SERVER_ROUND, RUN))
            await monitor.publish(topic(Kind.SERVER_ROUND, RUN), b"from monitor")  # denied
            await dev0.publish(topic(Kind.METRICS, RUN, node="dev00", role="device"), b"{}")
            mon_got, d0_got = await asyncio.gather(_received(monitor, 1.0), _received(dev0, 1.0))
        # (Retained statuses of earlier runs on this broker arrive too: telemetry is readable.)
        assert all("/telemetry/" in m.topic for m in mon_got if m.retain)
        assert [m.topic for m in mon_got if not m.retain] == [
            f"emo/{RUN}/telemetry/metrics/device/dev00"
        ]
        assert d0_got == []

    asyncio.run(main())


@pytest.mark.broker
def test_provisioned_brokers_redo_a_provisioning_whose_port_was_taken() -> None:
    """The race the full suite hit under load: a port picked free is taken before Mosquitto
    binds it. The first attempt here gets a port that a socket of ours holds; the helper must
    see "Address already in use", provision again on a new port, and start."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    ports: list[int] = []

    def make(out: Path) -> list[tuple[Path, int]]:
        ports.append(taken if not ports else find_free_port())
        provision(out / "f", 1, 0, port=ports[-1], bind="127.0.0.1")
        return [(out / "f" / "mosquitto.conf", ports[-1])]

    try:
        with provisioned_brokers("emo-taken-", make) as out:
            assert len(ports) == 2 and ports[1] != taken
            assert (out / "f" / "mosquitto.conf").is_file()
            assert port_open("127.0.0.1", ports[1])
    finally:
        holder.close()
