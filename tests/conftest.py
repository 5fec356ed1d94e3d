"""Shared pytest fixtures for emo-mqtt.

Broker fixtures never connect to a broker they did not start (a system Mosquitto may be
listening on 1883): each one starts its own on a free port and stops it afterwards.
Their run directories live under pytest's tmp_path, so a failing test's broker log is
still there to read (``<tmp>/.../mosquitto/mosquitto.log``).
"""

from __future__ import annotations

import asyncio
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from emo_mqtt.broker.launch import BrokerHandle, find_free_port, find_mosquitto, port_open
from emo_mqtt.broker.url import BrokerURL
from emo_mqtt.bus import Bus, Message
from emo_mqtt.provision import load_node_config, provision

# ------------------------------------------------------------------ brokers

MOSQUITTO_MISSING = "install mosquitto: apt-get install -y mosquitto"
#: Fixtures that start a broker: a test using one is a ``broker`` test.
BROKER_FIXTURES = frozenset({"mosquitto", "fresh_mosquitto", "amqtt_broker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a broker fixture ``broker``, so ``-m "not broker"`` (the fast
    lane, ``scripts/test.sh --fast``) leaves it out without each test having to say so."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(autouse=True)
def _brokers_only_in_broker_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail a test that starts a broker of its own without the ``broker`` marker.

    The fast lane relies on the marker; an unmarked broker test would make it slow (and need
    Mosquitto) without anyone noticing.
    """
    if request.node.get_closest_marker("broker") is not None:
        return

    def refuse(self: BrokerHandle) -> None:
        pytest.fail(
            f"{request.node.nodeid} starts a broker: mark it @pytest.mark.broker", pytrace=False
        )

    monkeypatch.setattr(BrokerHandle, "start", refuse)


def _mosquitto(workdir: Path) -> BrokerHandle:
    # Fail, never skip: a suite that silently skips its broker tests looks green in CI.
    if find_mosquitto() is None:
        pytest.fail(MOSQUITTO_MISSING, pytrace=False)
    return BrokerHandle(kind="mosquitto", workdir=workdir)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """A Mosquitto with the project's config on a free port, shared by the whole session.

    Do not stop, restart or kill it: use ``fresh_mosquitto`` for that.
    """
    with _mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[BrokerHandle]:
    """A Mosquitto of this test's own, free to be restarted, killed or stopped."""
    with _mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    """The embedded amqtt broker (MQTT 3.1.1 only, no persistence) on a free port."""
    with BrokerHandle(kind="amqtt", workdir=tmp_path / "amqtt") as broker:
        yield broker


@dataclass
class Fleet:
    """A provisioned fleet (2 devices, 1 overlay) and its TLS broker with ACLs."""

    dir: Path
    port: int

    def url(self, username: str) -> BrokerURL:
        """The broker URL (login and TLS files) of ``username``'s node.json."""
        return load_node_config(self.dir / "nodes" / username / "node.json").broker


class PortTaken(Exception):
    """A provisioned broker could not bind the port picked for it (someone took it first)."""


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_listening(
    procs: list[subprocess.Popen[bytes]], ports: list[int], logs: list[Path]
) -> None:
    for proc, port, log in zip(procs, ports, logs, strict=True):
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None:
                text = log.read_text(errors="replace")
                if "address already in use" in text.lower():
                    raise PortTaken(text)
                raise AssertionError(text)
            assert time.monotonic() < deadline, f"the provisioned broker on {port} did not listen"
            time.sleep(0.05)


@contextmanager
def provisioned_brokers(
    prefix: str, make: Callable[[Path], list[tuple[Path, int]]], attempts: int = 5
) -> Iterator[Path]:
    """Brokers started from provisioned configs as they are; yields the provisioning dir.

    ``make(out)`` provisions into ``out`` on freshly picked ports and returns each broker's
    (mosquitto.conf, port). A port is picked before the broker binds it, so a busy machine
    (several suites at once) can take it in between: then the whole provisioning is redone on
    new ports, as :meth:`BrokerHandle.start` does for its own brokers. Under /tmp rather than
    pytest's tmp_path: the brokers drop from root to the `mosquitto` user, which cannot enter
    pytest's private (0700) base directory.
    """
    binary = find_mosquitto()
    assert binary is not None, MOSQUITTO_MISSING
    for attempt in range(attempts):
        out = Path(tempfile.mkdtemp(prefix=prefix))
        out.chmod(0o755)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            brokers = make(out)
            # A port someone holds would answer the probe below as if it were our broker.
            if not all(_bindable(port) for _, port in brokers):
                if attempt == attempts - 1:
                    raise PortTaken(f"ports {[port for _, port in brokers]} stay taken")
                continue
            logs = [out / f"broker{k}.log" for k in range(len(brokers))]
            for (conf, _), log_path in zip(brokers, logs, strict=True):
                with log_path.open("wb") as log:
                    procs.append(
                        subprocess.Popen(
                            [str(binary), "-c", str(conf)],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            try:
                _wait_listening(procs, [port for _, port in brokers], logs)
            except PortTaken:
                if attempt == attempts - 1:
                    raise
                continue
            yield out
            return
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """`emo fleet provision` output and a Mosquitto started with its mosquitto.conf as is."""
    ports: list[int] = []

    def make(out: Path) -> list[tuple[Path, int]]:
        ports[:] = [find_free_port()]
        summary = provision(out / "f", 2, 1, port=ports[0], bind="127.0.0.1")
        assert "warning" not in summary, summary
        return [(out / "f" / "mosquitto.conf", ports[0])]

    with provisioned_brokers("emo-fleet-", make) as out:
        yield Fleet(out / "f", ports[0])


# ------------------------------------------------------------------ scenarios

_TINY_SCENARIO = """
[run]
name = "{name}"
rounds = 2
[data]
samples_per_device = 200
validation_samples = 300
eval_samples_per_round = 300
[fleet]
devices = 2
overlays = 1
round_deadline_s = 60
[emo]
overlay_steps_per_round = 10
"""


@pytest.fixture
def tiny_scenario(tmp_path: Path) -> Callable[[str], Path]:
    """Write a 2-device, 1-overlay, 2-round scenario file named ``<name>.toml``; its path."""

    def write(name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(_TINY_SCENARIO.format(name=name))
        return path

    return write


# ------------------------------------------------------------------ torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one torch thread (tiny models: faster, and steady on 2 busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ waiting

#: Generous: a deadline in a test only turns a hang into a failure.
WAIT_S = 30.0


async def take_messages(bus: Bus, n: int, within_s: float = WAIT_S) -> list[Message]:
    """The next ``n`` whole messages of ``bus``."""
    out: list[Message] = []

    async def run() -> None:
        async for message in bus.messages():
            out.append(message)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), within_s)
    return out


def stream_lines(stream: object) -> queue.Queue[str | None]:
    """The lines of a subprocess's ``stream`` as they come (None at its end), read by a
    thread, so that a test can wait for one line with a deadline."""
    out: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:  # type: ignore[attr-defined]
            out.put(line)
        out.put(None)

    threading.Thread(target=read, daemon=True).start()
    return out


async def until(condition: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    """Wait for a condition that no event announces (connection state, counters)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.005)
