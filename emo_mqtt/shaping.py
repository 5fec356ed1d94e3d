"""A per-node asyncio TCP shaping proxy: bandwidth, latency, jitter, loss and outages.

This kernel has no ``tc netem``, so network scenarios are replayed in user space: each node
connects to its own :class:`ShapingProxy` instead of the broker, and the proxy relays the
bytes to the broker while enforcing a :class:`LinkSpec` per direction (uplink: node ->
broker, downlink: broker -> node). Because the real MQTT connection goes through it,
keepalive, QoS 1 redelivery, reconnects and chunk timeouts behave as they would in the field.

How each effect is emulated, and why:

* **Bandwidth** (``bandwidth_bps``, in *bytes* per second) is a token bucket whose burst is
  what the link carries in 10 ms (at least one 1500-byte packet, at most one TCP read,
  :data:`READ_SIZE`): a real link has no allowance to spend, so a 24 kB model update over a
  50 kbit/s link must take its 4 s, not leave at once in a 64 kB burst. The relay waits for
  the bucket *before* reading the next chunk, so a slow link pushes back on the sender
  through TCP flow control instead of buffering without bound.
* **Latency and jitter**: each chunk gets a one-way delay of ``latency_s`` plus jitter
  (uniform in ``[-jitter_s, +jitter_s]`` or normal with standard deviation ``jitter_s``,
  clipped at zero), drawn from a seeded RNG. A TCP stream never reorders bytes, so a chunk's
  release time is ``max(previous release, ready + delay)`` (:class:`DelaySchedule`).
* **Loss**: a proxy cannot drop bytes from a TCP stream without corrupting it. What a lossy
  link does to a TCP connection is make it *late*: the lost segment is retransmitted after a
  retransmission timeout. So, with probability ``loss`` per chunk, the chunk is delayed by one
  extra ``rto_s`` (0.2 s by default, Linux's minimum RTO), and, stream order being kept, every
  chunk behind it waits too (head-of-line blocking, as in real TCP).
* **Outages**: ``set_online(False)`` aborts every connection through the proxy (the node sees
  its connection reset, as when a cellular link drops) and new connections are refused until
  ``set_online(True)``, so the node's reconnect loop keeps trying and its broker session
  (subscriptions, queued QoS 1 messages) waits for it as in the field.
* ``set_link`` changes the specs at run time (time-varying traces); it applies to chunks
  read after the call, on open connections too.

The pure parts (:class:`LinkSpec`, :class:`TokenBucket`, :class:`DelaySchedule`) live in
:mod:`emo_mqtt.linkmodel`: they take the time as an argument and are tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from typing import Literal

from emo_mqtt.linkmodel import (
    READ_SIZE,
    DelaySchedule,
    LinkSpec,
    TokenBucket,
    link_burst,
)

#: Chunks waiting for their release time, per direction, before the relay stops reading.
MAX_IN_FLIGHT_CHUNKS = 1024


@dataclass
class ProxyStats:
    """Counters of one proxy.

    ``bytes_up``/``bytes_down``: bytes delivered to the broker / to the node;
    ``connections``: connections relayed; ``refused``: connections closed because the link
    was down or the broker unreachable; ``outages``: ``set_online(False)`` transitions;
    ``active``: connections open now; ``dropped_by_outage``: connections an outage cut.
    """

    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    refused: int = 0
    outages: int = 0
    active: int = 0
    dropped_by_outage: int = 0


class _Direction:
    """The shaping state of one direction of one connection."""

    def __init__(self, spec: LinkSpec, rng: random.Random, now: float) -> None:
        self.spec = spec
        self.bucket = TokenBucket(spec.bandwidth_bps, link_burst(spec.bandwidth_bps), now)
        self.schedule = DelaySchedule(rng)


class _Connection:
    """One node connection relayed to the broker: both directions' state and tasks."""

    def __init__(self, proxy: ShapingProxy, index: int) -> None:
        self.proxy = proxy
        now = asyncio.get_running_loop().time()
        # One RNG per connection and direction, derived from the proxy's seed, so a
        # connection's schedule does not depend on how the other direction interleaves.
        self.up = _Direction(proxy.uplink, random.Random(f"{proxy.seed}:{index}:up"), now)
        self.down = _Direction(proxy.downlink, random.Random(f"{proxy.seed}:{index}:down"), now)
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for w in self.writers:
            w.transport.abort()
        for t in self.tasks:
            t.cancel()


class ShapingProxy:
    """A TCP proxy from ``listen_host:listen_port`` to the broker, shaping both directions.

    Use one per node: ``await proxy.start()``, point the node at ``proxy.url``, and
    ``await proxy.close()`` at the end (or ``async with``).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        uplink: LinkSpec | None = None,
        downlink: LinkSpec | None = None,
        seed: int = 0,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.uplink = uplink or LinkSpec()
        self.downlink = downlink or LinkSpec()
        self.seed = seed
        self.listen_host = listen_host
        self.port = listen_port
        self.online = True
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._relisten: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[object]] = set()
        self._closed = False

    async def __aenter__(self) -> ShapingProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the proxy, for the node."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"mqtt://{host}:{self.port}"

    async def start(self) -> int:
        """Listen, and return the port (the kernel picks one when ``listen_port`` is 0)."""
        await self._listen()
        return self.port

    async def _listen(self) -> None:
        server = await asyncio.start_server(
            self._handle, self.listen_host, self.port, limit=READ_SIZE
        )
        self.port = int(server.sockets[0].getsockname()[1])
        self._server = server
        if not self.online:  # taken down again while this listener was starting
            server.close()

    async def close(self) -> None:
        """Stop listening and abort every connection."""
        self._closed = True
        if self._relisten is not None:
            with contextlib.suppress(OSError):
                await self._relisten
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        # Let the aborted handlers finish, so none is left for the loop to cancel.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def set_online(self, online: bool) -> None:
        """Take the link down or bring it back (call from the event loop's thread).

        Down: every connection through the proxy is aborted (the node sees a reset) and the
        listener is closed, so new connections are refused until the link is back. Refusing,
        rather than accepting and resetting, is deliberate: MqttBus notices a refused
        connect at once, but an accept-then-reset during the MQTT handshake left its
        reconnect loop stuck for more than 10 s when we tried it.
        """
        if self.online and not online:
            self.stats.outages += 1
            if self._server is not None:
                self._server.close()
            for conn in list(self._conns):
                conn.abort()
                self.stats.dropped_by_outage += 1
        elif online and not self.online and not self._closed:
            # Listen again on the same port (asyncio sets SO_REUSEADDR, so the old sockets
            # in TIME_WAIT do not block it).
            self._relisten = asyncio.get_running_loop().create_task(self._listen())
        self.online = online

    def set_link(self, uplink: LinkSpec | None = None, downlink: LinkSpec | None = None) -> None:
        """Change either direction's conditions, for new and open connections alike."""
        now = asyncio.get_running_loop().time()
        if uplink is not None:
            self.uplink = uplink
        if downlink is not None:
            self.downlink = downlink
        for conn in self._conns:
            for d, spec in ((conn.up, self.uplink), (conn.down, self.downlink)):
                d.spec = spec
                d.bucket.set_rate(spec.bandwidth_bps, now, link_burst(spec.bandwidth_bps))

    # -- relaying ------------------------------------------------------------------------------
    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if not self.online:
            # Only a connection accepted just as the link went down gets here.
            self.stats.refused += 1
            client_w.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(
                self.upstream_host, self.upstream_port, limit=READ_SIZE
            )
        except OSError:
            self.stats.refused += 1
            client_w.transport.abort()
            return
        if not self.online:  # the link went down while we were connecting upstream
            self.stats.refused += 1
            client_w.transport.abort()
            up_w.transport.abort()
            return
        self.stats.connections += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        conn = _Connection(self, self.stats.connections)
        conn.writers = [client_w, up_w]
        self._conns.add(conn)
        self.stats.active += 1
        conn.tasks = [
            asyncio.create_task(self._pump(client_r, up_w, conn, conn.up, "up")),
            asyncio.create_task(self._pump(up_r, client_w, conn, conn.down, "down")),
        ]
        try:
            # wait(), not gather(): the pumps end by cancellation on an abort, and that
            # must not surface as this handler's own error.
            await asyncio.wait(conn.tasks)
        finally:
            conn.abort()
            self._conns.discard(conn)
            self.stats.active -= 1

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        conn: _Connection,
        direction: _Direction,
        name: Literal["up", "down"],
    ) -> None:
        """Read ``src``, shape, write ``dst``; a reader and a writer task joined by a queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(MAX_IN_FLIGHT_CHUNKS)

        async def writer() -> None:
            while (item := await queue.get()) is not None:
                release, data = item
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
                if name == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
            # The source closed its half: pass the FIN on once every byte has gone.
            if dst.can_write_eof():
                dst.write_eof()

        def writer_done(task: asyncio.Task[None]) -> None:
            # A write that failed means the other end is gone: tear the whole pair down,
            # as a reset would, rather than leave the reader blocked.
            if not task.cancelled() and task.exception() is not None:
                conn.abort()

        out = asyncio.create_task(writer())
        out.add_done_callback(writer_done)
        try:
            while data := await src.read(READ_SIZE):
                ready = direction.bucket.reserve(len(data), loop.time())
                # Wait out the bandwidth here, before reading on: TCP flow control then
                # pushes back on the sender, as a slow link would.
                wait = ready - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await queue.put((direction.schedule.release(ready, direction.spec), data))
            await queue.put(None)
            await out
        except OSError:
            conn.abort()
        finally:
            out.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await out
