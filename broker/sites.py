"""Start a cloud Mosquitto and one bridged site Mosquitto per overlay, on one machine.

:class:`SiteBrokers` is what ``emo run --topology sites`` and the integration tests use:

* a **cloud** broker (:class:`~emo_mqtt.broker.launch.BrokerHandle`) for the server;
* per site ``k`` a **site** broker for overlay ``ovl<k>`` and its devices, whose
  configuration is the project's ``mosquitto.conf`` plus a bridge section
  (:func:`emo_mqtt.sites.bridge_section`) to the cloud;
* per site a **relay**: the bridge connects to it, and it relays to the cloud broker while a
  :class:`~emo_mqtt.mqttwire.WireMeter` per direction counts every byte and every PUBLISH by
  topic kind. ``bridge_counts`` is therefore what crossed, read off the wire.

With ``netns=True`` every site broker runs in its own network namespace (``ip netns``),
joined to this host by a veth pair: a separate host as far as TCP is concerned, reachable
only through its veth address. That needs root and ``ip``; :func:`netns_problem` says why
not, and :class:`SiteBrokers` then raises :class:`~emo_mqtt.errors.BrokerError`.

The relays run on an event loop of their own in a daemon thread, so the class is synchronous
like :class:`~emo_mqtt.broker.launch.BrokerHandle` and works from pytest fixtures and from
``emo run`` before its event loop starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from emo_mqtt.broker.launch import (
    DEFAULT_MAX_PACKET_SIZE,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    BrokerHandle,
    _check_port_free,
    _log_tail,
    _PortInUse,
    _preexec,
    find_free_port,
    find_mosquitto,
    port_open,
    render_config,
)
from emo_mqtt.broker.url import BrokerURL
from emo_mqtt.config import RunConfig
from emo_mqtt.errors import BrokerError
from emo_mqtt.mqttwire import WireMeter
from emo_mqtt.sites import Topology, bridge_figures, bridge_section, bridge_topics, site_name
from emo_mqtt.sites import site_nodes as _site_nodes

__all__ = ["SiteBrokers", "netns_problem"]

READ_SIZE = 65536
_CONNACK, _SUBACK = 2, 9


@functools.cache
def netns_problem() -> str | None:
    """Why site brokers cannot run in network namespaces here, or None if they can.

    Probes by creating (and deleting) a namespace: being root is not enough in a container
    without CAP_SYS_ADMIN.
    """
    ip = shutil.which("ip") or ("/usr/sbin/ip" if os.access("/usr/sbin/ip", os.X_OK) else None)
    if ip is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"emo-probe-{os.getpid()}"
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run([ip, "netns", "del", name], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


class _Namespace:
    """One network namespace joined to the host by a veth pair on a /30."""

    def __init__(self, name: str, host_if: str, host_ip: str, ns_ip: str) -> None:
        self.name, self.host_if, self.host_ip, self.ns_ip = name, host_if, host_ip, ns_ip
        self.made = False

    def create(self) -> None:
        _ip("netns", "add", self.name)
        self.made = True
        peer = f"{self.host_if}n"
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (
            ("addr", "add", f"{self.ns_ip}/30", "dev", peer),
            ("link", "set", peer, "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("netns", "exec", self.name, "ip", *args)

    def delete(self) -> None:
        if self.made:  # deleting the namespace deletes its veth end, and so the pair
            with contextlib.suppress(BrokerError):
                _ip("netns", "del", self.name)
            self.made = False


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface of this host uses (random: runs side by side)."""
    used = subprocess.run(
        ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=False
    ).stdout
    rng = random.Random()
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(128, 250)}.{rng.randrange(256)}.0/24")
        if f" {'.'.join(str(net.network_address).split('.')[:3])}." not in used:
            return net
    raise BrokerError("no free 10.x.y.0/24 subnet for the site namespaces")


class _Relay:
    """A TCP relay for one site's bridge, counting both directions with wire meters."""

    def __init__(self, listen_host: str, upstream: tuple[str, int], lock: threading.Lock) -> None:
        self.listen_host = listen_host
        self.upstream = upstream
        self.lock = lock
        self.port = 0
        self.up: list[WireMeter] = []  # one per connection: each is its own stream
        self.down: list[WireMeter] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, site_r: asyncio.StreamReader, site_w: asyncio.StreamWriter) -> None:
        try:
            cloud_r, cloud_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            site_w.transport.abort()
            return
        up, down = WireMeter(), WireMeter()
        with self.lock:
            self.up.append(up)
            self.down.append(down)
        pumps = [
            asyncio.create_task(self._pump(site_r, cloud_w, up)),
            asyncio.create_task(self._pump(cloud_r, site_w, down)),
        ]
        self.tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (site_w, cloud_w):
                w.transport.abort()
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self.tasks.difference_update(pumps)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, meter: WireMeter
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(READ_SIZE):
                dst.write(data)
                with self.lock:
                    meter.feed(data)
                await dst.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _sum(meters: list[WireMeter]) -> dict[str, object]:
    by_kind: dict[str, int] = {}
    for m in meters:
        for kind, n in m.by_kind.items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    return {"bytes": sum(m.total for m in meters), "by_kind": by_kind}


class _SiteProcess:
    """A site's Mosquitto: the project's config plus a bridge, optionally in a namespace."""

    def __init__(self, workdir: Path, host: str, port: int, prefix: list[str]) -> None:
        self.workdir, self.host, self.port, self.prefix = workdir, host, port, prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: IO[bytes] | None = None

    def start(self, bridge: str, max_packet_size: int) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("site brokers need Mosquitto (apt-get install -y mosquitto)")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if not self.prefix:  # on loopback: fail fast (and retryably) on a taken port
            _check_port_free(self.host, self.port)
        conf = self.workdir / "mosquitto.conf"
        base = render_config(
            self.port, self.host, self.workdir / "data", max_packet_size=max_packet_size
        )
        conf.write_text(base + "\n" + bridge, encoding="utf-8")
        log_path = self.workdir / "mosquitto.log"
        self._logf = log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, str(binary), "-c", str(conf)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_preexec(),  # the site broker dies with us, as the cloud one does
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                tail = _log_tail(log_path)
                cls = _PortInUse if "address already in use" in tail.lower() else BrokerError
                raise cls(f"site broker exited during start-up:\n{tail}")
            if port_open(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"site broker did not listen within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._logf is not None:
            self._logf.close()
            self._logf = None


class SiteBrokers:
    """A cloud broker and one bridged site broker per overlay of ``config``.

    ``with SiteBrokers(config) as sites: sites.topology.broker_for("dev03")``.
    :meth:`bridge_counts` reads the relays' meters (see :func:`emo_mqtt.sites.bridge_figures`).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        netns: bool = False,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        if netns and (why := netns_problem()) is not None:
            raise BrokerError(f"cannot put site brokers in network namespaces: {why}")
        if find_mosquitto() is None:
            raise BrokerError("--topology sites needs Mosquitto: apt-get install -y mosquitto")
        self.config = config
        self.netns = netns
        self.max_packet_size = max_packet_size
        self.count = len(config.overlay_ids())
        # Checked before anything starts: a fleet without overlays has no sites.
        Topology.for_config(config, "mqtt://127.0.0.1:1", ["mqtt://127.0.0.1:1"] * self.count)
        self.cloud = BrokerHandle(kind="mosquitto", max_packet_size=max_packet_size)
        self.workdir: Path | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.relays: list[_Relay] = []
        self.sites: list[_SiteProcess] = []
        self.namespaces: list[_Namespace] = []
        self._topology: Topology | None = None

    @property
    def topology(self) -> Topology:
        """Which broker each node uses (after :meth:`start`)."""
        if self._topology is None:
            raise BrokerError("site brokers not started")
        return self._topology

    def describe(self) -> str:
        where = "in network namespaces" if self.netns else "on loopback"
        sites = ", ".join(self.topology.sites)
        return f"cloud {self.cloud.describe()}; {self.count} bridged site brokers {where}: {sites}"

    def _run(self, coro: object) -> object:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    def start(self) -> None:
        """Start the cloud, the relays, then the site brokers; return once bridges are up."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="emo-sites-"))
        self.cloud.workdir = self.workdir / "cloud"
        self.cloud.start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="emo-bridge-relays", daemon=True
        )
        self._thread.start()
        subnet = _free_subnet() if self.netns else None
        urls: list[str] = []
        for k in range(self.count):
            name = site_name(k)
            if subnet is not None:
                base = subnet.network_address + 4 * k
                ns = _Namespace(
                    f"emo-{os.getpid()}-{name}",
                    f"e{os.getpid() % 100000}h{k}",
                    str(base + 1),
                    str(base + 2),
                )
                self.namespaces.append(ns)
                ns.create()
                relay_host, host, port = ns.host_ip, ns.ns_ip, 1883
                prefix = ["ip", "netns", "exec", ns.name]
            else:
                relay_host, host, prefix = "127.0.0.1", "127.0.0.1", []
                port = find_free_port(host)
            relay = _Relay(relay_host, (self.cloud.host, self.cloud.port), self._lock)
            self._run(relay.start())
            self.relays.append(relay)
            devices, overlays = _site_nodes(self.config, k)
            bridge = bridge_section(
                name, f"{relay_host}:{relay.port}", bridge_topics(devices, overlays)
            )
            site = _SiteProcess(self.workdir / name, host, port, prefix)
            self.sites.append(site)
            for attempt in range(3):
                try:
                    site.start(bridge, self.max_packet_size)
                    break
                except _PortInUse:
                    # Another process took the loopback port we picked before the broker
                    # bound it (as BrokerHandle.start does): pick another. A namespace's
                    # port is its own and is never moved.
                    if prefix or attempt == 2:
                        raise
                    site.port = port = find_free_port(host)
            urls.append(str(BrokerURL("mqtt", host, port)))
        self._topology = Topology.for_config(self.config, self.cloud.url, urls)
        self._wait_bridges()

    def _wait_bridges(self) -> None:
        """Wait until every bridge is connected and subscribed (CONNACK and SUBACK seen)."""
        deadline = time.monotonic() + START_TIMEOUT_S * 2
        while True:
            with self._lock:
                up = [
                    any(m.packets[_CONNACK] and m.packets[_SUBACK] for m in r.down)
                    for r in self.relays
                ]
            if all(up):
                return
            if time.monotonic() > deadline:
                down = [site_name(k) for k, ok in enumerate(up) if not ok]
                logs = "\n".join(
                    _log_tail(s.workdir / "mosquitto.log")
                    for k, s in enumerate(self.sites)
                    if not up[k]
                )
                raise BrokerError(f"bridges of {down} did not come up; log:\n{logs}")
            time.sleep(0.02)

    def bridge_counts(self) -> dict[str, object]:
        """What crossed every bridge so far: ``bytes`` (both ways), ``activation_bytes``...

        See :func:`emo_mqtt.sites.bridge_figures`; ``sites`` breaks it down by site.
        """
        with self._lock:
            per_site = {
                site_name(k): bridge_figures(_sum(r.up), _sum(r.down))
                for k, r in enumerate(self.relays)
            }
            total = bridge_figures(
                _sum([m for r in self.relays for m in r.up]),
                _sum([m for r in self.relays for m in r.down]),
            )
        total["sites"] = per_site
        return total

    def close(self) -> None:
        """Stop the site brokers, the relays and the cloud; remove namespaces and files."""
        for site in self.sites:
            site.stop()
        if self._loop is not None:
            loop = self._loop
            with contextlib.suppress(Exception):
                for relay in self.relays:
                    asyncio.run_coroutine_threadsafe(relay.close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            loop.close()
            self._loop = None
        for ns in self.namespaces:
            ns.delete()
        self.cloud.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> SiteBrokers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
