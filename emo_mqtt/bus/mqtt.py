"""The MQTT bus: the one module of emo-mqtt that talks to aiomqtt (and, through it, paho).

What it adds to a bare aiomqtt client:

* **Protocol fallback.** It connects with MQTT 5 and falls back to 3.1.1 when the broker
  refuses that version (the embedded amqtt broker speaks only 3.1.1). Nothing in emo-mqtt
  needs MQTT 5 features: everything a receiver needs lives in the codec envelope.
* **Persistent sessions and reconnects.** A stable client id, ``clean_start=False`` and a
  session expiry keep subscriptions and queued QoS 1 messages at the broker across
  disconnects. A supervisor task reconnects with jittered exponential backoff and
  re-subscribes. A frame whose acknowledgement was lost with the connection is published
  again on the next connection (at-least-once; receivers de-duplicate by envelope sequence
  and chunk transfer id).
* **Backpressure.** Incoming messages (chunk frames reassembled as they arrive) go to the
  bounded inbox of :class:`~emo_mqtt.bus.base.Bus`; when it fills, the socket reader is
  removed from the event loop, so TCP flow control pushes back and the broker keeps the
  messages. aiomqtt's own queue would discard
  messages when full; we never use it.
* **A last will** published (retained) by the broker when the node dies.
* **Fewer copies and wake-ups than paho and aiomqtt.** On our own paho clients only,
  ``emo_mqtt/bus/paho_fast.py`` replaces paho's copying publish and receive paths.
  aiomqtt spends a task per publish and a thread-safe wake-up plus two
  ``epoll_ctl`` calls per outgoing packet; :meth:`_Client.emo_publish` and
  :meth:`_Client._on_socket_register_write` do without. With the codec's out-of-band
  tensors and the reassembler's single join, this is what lets the bus move a chunked
  10 MB tensor faster than bare aiomqtt moves the same bytes in one piece
  (``emo bench bus``).

It uses a few private members of ``aiomqtt.Client`` (``_on_message``, ``_on_socket_open``,
``_on_socket_register_write``, ``_pending_publishes``, ``_disconnected``, ``_loop``) and of
paho's client (see ``emo_mqtt/bus/paho_fast.py``);
``pyproject.toml`` pins both to their 2.x lines, the fast paths stand down when paho's
internals do not look as expected, and ``tests/test_bus_mqtt.py`` exercises each of them
against a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from emo_mqtt.broker.url import BrokerURL, parse_broker_url
from emo_mqtt.bus.base import Bus, BusOptions, Message
from emo_mqtt.bus.paho_fast import install_fast_paths
from emo_mqtt.errors import BusError

log = logging.getLogger("emo_mqtt.bus.mqtt")

Protocol = Literal["auto", "5", "3.1.1"]

# CONNACK codes that mean "this broker does not speak that protocol version":
# 0x01 in MQTT 3.1.1, 0x84 (132) "Unsupported Protocol Version" in MQTT 5.
_UNSUPPORTED_PROTOCOL = {1, 132}
# CONNACK codes that retrying cannot fix: bad credentials, not authorised, banned.
_FATAL_CONNACK = {4, 5, 134, 135, 138, 140}
# amqtt (3.1.1 only) neither accepts nor refuses an MQTT 5 CONNECT: it waits for bytes
# that never come. Until a version is negotiated, an MQTT 5 CONNACK is awaited this long.
_MQTT5_PROBE_S = 2.0


class _ConnectionLost(Exception):
    """The connection ended before the broker acknowledged a publish."""


class _Ack:
    """A publish awaiting its acknowledgement; stands in for aiomqtt's confirmation Event."""

    __slots__ = ("future", "mid")

    def __init__(self, future: asyncio.Future[None], mid: int) -> None:
        self.future = future
        self.mid = mid

    def set(self) -> None:  # called by aiomqtt's on_publish handler
        if not self.future.done():
            self.future.set_result(None)


class _Client(aiomqtt.Client):
    """aiomqtt's client, feeding our inbox and able to pause its socket reader."""

    def __init__(self, bus: MqttBus, **kwargs: Any) -> None:
        self._emo_bus = bus
        self._emo_fd = -1
        super().__init__(**kwargs)
        # A chunked publish keeps a window of frames in flight on purpose; aiomqtt warns
        # about more than 10 pending calls.
        self.pending_calls_threshold = 10_000
        self.emo_fast = install_fast_paths(self._client)
        self._emo_watched: asyncio.Future[None] | None = None

    # paho calls this from the event loop thread (aiomqtt drives paho with add_reader).
    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._emo_bus._deliver(
            Message(message.topic, message.payload, message.qos, bool(message.retain))
        )

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        super()._on_socket_open(client, userdata, sock)
        self._emo_fd = sock.fileno()
        # paho calls this from aiomqtt's executor thread; queue behind aiomqtt's add_reader.
        self._loop.call_soon_threadsafe(self._emo_sync_reading)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        # aiomqtt answers every queued packet (each frame, each PUBACK) with a thread-safe
        # wake-up that registers a writer, one more loop pass for the socket to report
        # writable, and an unregistration: two epoll_ctl calls, a self-pipe write and two
        # passes of latency. On the loop's own thread, write on the next pass instead, and
        # register a writer only if the socket is full.
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if not on_loop:  # paho queues CONNECT from aiomqtt's executor thread
            super()._on_socket_register_write(client, userdata, sock)
            return
        self._loop.call_soon(self._emo_write, sock)

    def _emo_write(self, sock: Any) -> None:
        client = self._client
        if client._sock is not sock or sock is None:  # that connection is gone
            return
        fd: int = sock.fileno()
        try:
            client.loop_write()
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
            return
        # Bytes left means the socket is full (paho stays "registered" meanwhile); none
        # left, paho has unregistered through aiomqtt. A write error closed the socket.
        if client.want_write() and client._sock is sock:
            self._loop.add_writer(fd, self._emo_write, sock)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        super()._on_socket_close(client, userdata, sock)
        self._emo_fd = -1

    def _emo_sync_reading(self) -> None:
        if self._emo_bus.reading_paused:
            self.emo_pause()

    def emo_pause(self) -> None:
        if self._emo_fd >= 0:
            self._loop.remove_reader(self._emo_fd)

    def emo_resume(self) -> None:
        if self._emo_fd >= 0 and not self._disconnected.done():
            self._loop.add_reader(self._emo_fd, self._emo_read)
            # TLS may hold decrypted bytes that will never make the fd readable again.
            self._loop.call_soon(self._emo_read)

    def _emo_read(self) -> None:
        # The same as aiomqtt's reader callback: a read error means the connection broke.
        try:
            while True:
                self._client.loop_read()
                pending = getattr(self._client._sock, "pending", None)
                if pending is None or pending() <= 0:
                    break
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def emo_abandon(self) -> None:
        """Close the socket of an attempt that failed before its CONNACK (aiomqtt keeps it)."""
        with contextlib.suppress(Exception):
            self._client.disconnect()

    @property
    def lost(self) -> asyncio.Future[None]:
        """Resolves when this connection ends, for any reason."""
        return self._disconnected

    def emo_publish(self, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> _Ack:
        """Hand a frame to paho; the returned ack's future resolves when it is acknowledged.

        aiomqtt's ``publish`` costs a task and a ``wait_for`` per call, and callers must race
        it against the connection's end; here the future itself fails with
        :class:`_ConnectionLost` when the connection ends first (QoS 0: resolves once sent).
        """
        future: asyncio.Future[None] = self._loop.create_future()
        lost = self._disconnected
        if lost.done():
            future.set_exception(_ConnectionLost())
            return _Ack(future, -1)
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        ack = _Ack(future, info.mid)
        if info.is_published():
            future.set_result(None)
            return ack
        self._pending_publishes[info.mid] = ack  # type: ignore[assignment]
        if self._emo_watched is not lost:
            self._emo_watched = lost
            lost.add_done_callback(self._emo_fail_acks)
        return ack

    def emo_forget(self, ack: _Ack) -> None:
        """Stop tracking an ack nobody waits for any more (its publish timed out)."""
        if self._pending_publishes.get(ack.mid) is ack:  # type: ignore[comparison-overlap]
            del self._pending_publishes[ack.mid]

    def _emo_fail_acks(self, _lost: asyncio.Future[None]) -> None:
        for ack in list(self._pending_publishes.values()):
            if isinstance(ack, _Ack) and not ack.future.done():
                ack.future.set_exception(_ConnectionLost())


def tls_context_for(url: BrokerURL) -> ssl.SSLContext:
    """The TLS context of an ``mqtts`` connection: verify the broker, present our cert.

    The CA and the client certificate come from the URL's ``ca_file``/``cert_file``/
    ``key_file`` (set from a node config), else from the environment variables
    ``EMO_MQTT_CA``, ``EMO_MQTT_CERT`` and ``EMO_MQTT_KEY``; without a CA, the system's CAs.
    The broker's host name (or IP address) is always checked against its certificate.
    """
    ca = url.ca_file or os.environ.get("EMO_MQTT_CA") or None
    cert = url.cert_file or os.environ.get("EMO_MQTT_CERT") or None
    key = url.key_file or os.environ.get("EMO_MQTT_KEY") or None
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise BusError(f"cannot load the TLS files for {url}: {exc}") from exc
    return context


class MqttBus(Bus):
    """A :class:`~emo_mqtt.bus.base.Bus` over an MQTT broker (Mosquitto, amqtt, ...)."""

    def __init__(
        self,
        url: str | BrokerURL,
        client_id: str,
        *,
        will: Message | None = None,
        clean_start: bool = False,
        session_expiry_s: int = 3600,
        keepalive_s: int = 30,
        protocol: Protocol = "auto",
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
        options: BusOptions | None = None,
    ) -> None:
        super().__init__(client_id, options)
        self.url = url if isinstance(url, BrokerURL) else parse_broker_url(url)
        self.will = will
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.protocol: Protocol = protocol
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        if tls_context is None and self.url.scheme == "mqtts":
            tls_context = tls_context_for(self.url)
        self.tls_context = tls_context
        self.negotiated: str | None = None
        self._client: _Client | None = None
        self._up = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._fatal: BusError | None = None
        self._last_error: BaseException | None = None

    # -- connection management --------------------------------------------------------------
    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and not client.lost.done()

    @property
    def reading_paused(self) -> bool:
        return self._paused

    async def connect(self) -> None:
        """Connect, waiting at most ``connect_timeout_s`` for the first connection."""
        if self._supervisor is not None:
            return
        self._closed = False
        # A local reference: a close() meanwhile sets self._supervisor to None.
        supervisor = asyncio.create_task(self._supervise(), name=f"bus:{self.client_id}")
        self._supervisor = supervisor
        wait = self.options.first_connect_timeout_s or self.connect_timeout_s
        try:
            async with asyncio.timeout(wait):
                while not self.connected:
                    if self._fatal is not None:
                        raise self._fatal
                    if supervisor.done():
                        raise BusError(f"bus {self.client_id}: supervisor ended")
                    await self._wait_up()
        except TimeoutError:
            await self.close()
            raise BusError(
                f"could not connect to {self.url} within {wait:g} s: "
                f"{self._last_error!r}"
            ) from None
        except BusError:
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect gracefully (the broker does not publish the will) and stop reconnecting."""
        self._closed = True
        client = self._client
        if client is not None and not client.lost.done():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.__aexit__(None, None, None)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._client = None
        await super().close()

    def _make_client(self, protocol: Literal["5", "3.1.1"]) -> _Client:
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, bytes(self.will.payload), self.will.qos, True)
        kwargs: dict[str, Any] = {
            "hostname": self.url.host,
            "port": self.url.port,
            "username": self.url.username,
            "password": self.url.password,
            "identifier": self.client_id,
            "will": will,
            "keepalive": self.keepalive_s,
            "timeout": self.connect_timeout_s,
            "tls_context": self.tls_context,
            "max_inflight_messages": max(20, self.options.publish_window * 2),
            "socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        }
        if protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0 if self.clean_start else self.session_expiry_s
            kwargs.update(
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=self.clean_start,
                properties=properties,
            )
        else:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=self.clean_start)
        return _Client(self, **kwargs)

    async def _supervise(self) -> None:
        delay = self.reconnect_min_s
        protocol: Literal["5", "3.1.1"] = "3.1.1" if self.protocol == "3.1.1" else "5"
        first = True
        while not self._closed:
            client = self._make_client(protocol)
            if protocol == "5" and self.protocol == "auto" and self.negotiated is None:
                client.timeout = min(_MQTT5_PROBE_S, self.connect_timeout_s / 2)
            try:
                await client.__aenter__()
            except MqttConnectError as exc:
                code = getattr(exc.rc, "value", exc.rc)
                self._last_error = exc
                if protocol == "5" and self.protocol == "auto" and code in _UNSUPPORTED_PROTOCOL:
                    log.info("%s: broker refused MQTT 5, using 3.1.1", self.client_id)
                    protocol = "3.1.1"
                    continue
                if code in _FATAL_CONNACK:
                    self._fatal = BusError(f"broker {self.url} refused {self.client_id}: {exc}")
                    self._fatal.__cause__ = exc
                    return
            except (aiomqtt.MqttError, OSError) as exc:
                self._last_error = exc
                client.emo_abandon()
                # Some 3.1.1 brokers just close the socket on a protocol version they don't
                # know: until one connection succeeds, alternate versions between attempts.
                if self.negotiated is None and self.protocol == "auto":
                    protocol = "3.1.1" if protocol == "5" else "5"
            else:
                client.timeout = self.connect_timeout_s
                delay = self.reconnect_min_s
                self.negotiated = protocol
                await self._serve(client, first)
                first = False
            if self._closed:
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max_s)

    async def _serve(self, client: _Client, first: bool) -> None:
        """Run one live connection until it ends."""
        self._client = client
        try:
            if self._subscriptions:
                await client.subscribe(list(self._subscriptions.items()))
            self._up.set()
            if not first:
                self.stats.reconnects += 1
                log.info("%s: reconnected to %s", self.client_id, self.url)
                if self.on_reconnected is not None:
                    self.on_reconnected()
            await asyncio.wait({client.lost})
            if not client.lost.cancelled() and client.lost.exception() is not None:
                self._last_error = client.lost.exception()
        except (aiomqtt.MqttError, OSError) as exc:
            self._last_error = exc
        finally:
            self._up.clear()
            if not client.lost.done():
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    await client.__aexit__(None, None, None)
            else:
                # Release aiomqtt's reusability lock; the connection is already gone.
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
                    await client.__aexit__(None, None, None)
        if not self._closed:
            log.warning("%s: connection to %s lost: %r", self.client_id, self.url, self._last_error)

    async def _live_client(self) -> _Client:
        while True:
            if self._closed:
                raise BusError(f"bus {self.client_id} is closed")
            if self._fatal is not None:
                raise self._fatal
            client = self._client
            if client is not None and not client.lost.done():
                return client
            await self._wait_up()

    async def _wait_up(self) -> None:
        """While not connected: wait (at most 0.1 s) for the supervisor's next connection."""
        # A connection just lost leaves _up set until its _serve runs: waiting on it would
        # return at once, and the caller's loop would spin without ever letting _serve run.
        self._up.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.1):
                await self._up.wait()

    # -- Bus primitives -----------------------------------------------------------------------
    async def _subscribe(self, topic_filter: str, qos: int) -> None:
        client = self._client
        if client is None or client.lost.done():
            return  # subscribed on the next connection by the supervisor
        try:
            await client.subscribe(topic_filter, qos)
        except aiomqtt.MqttError as exc:
            if not client.lost.done():
                raise BusError(f"subscribe to {topic_filter} failed: {exc}") from exc

    async def _unsubscribe(self, topic_filter: str) -> None:
        client = self._client
        if client is not None and not client.lost.done():
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(topic_filter)

    async def _publish_chunk(self, topic: str, chunk: bytearray, qos: int) -> None:
        await self._publish_frame(topic, chunk, qos, False)  # paho takes it without a copy

    async def _publish_frame(
        self, topic: str, frame: bytes | bytearray, qos: int, retain: bool
    ) -> None:
        while True:
            client = await self._live_client()
            try:
                ack = client.emo_publish(topic, frame, qos, retain)
            except aiomqtt.MqttError as exc:
                if not client.lost.done():
                    raise BusError(f"publish to {topic} failed: {exc}") from exc
            else:
                try:
                    await ack.future
                    return
                except _ConnectionLost:
                    pass
                finally:
                    if ack.future.cancelled():  # our deadline passed first
                        client.emo_forget(ack)
            # The connection went down before the broker acknowledged: publish again on the
            # next one (at-least-once). Never await client.lost itself: it may hold the
            # exception that ended the connection.
            self.stats.republished_frames += 1
            await asyncio.wait({client.lost}, timeout=0.2)

    def _pause_reading(self) -> None:
        if self._client is not None:
            self._client.emo_pause()

    def _resume_reading(self) -> None:
        if self._client is not None:
            self._client.emo_resume()


async def bare_aiomqtt_transfer(url: str, where: str, payload: bytes, count: int) -> float:
    """Reference for ``emo bench bus``: seconds to move ``count`` raw payloads at QoS 1.

    Two plain aiomqtt clients, no codec and no chunking: the publisher awaits each publish
    (as aiomqtt's documentation does) and the clock stops when the subscriber has them all.
    It lives here because this is the one module that imports aiomqtt.
    """
    target = parse_broker_url(url)
    common: dict[str, Any] = {
        "hostname": target.host,
        "port": target.port,
        "username": target.username,
        "password": target.password,
        "protocol": aiomqtt.ProtocolVersion.V5,
        "timeout": 60,
    }
    try:
        return await _bare_transfer(common, where, payload, count)
    except (aiomqtt.MqttError, TimeoutError) as exc:
        raise BusError(
            f"bare aiomqtt reference failed ({exc!r}); a broker that caps packets below "
            f"{len(payload)} bytes refuses it: start one without the cap or pass --no-baseline"
        ) from exc


async def _bare_transfer(common: dict[str, Any], where: str, payload: bytes, count: int) -> float:
    async with (
        aiomqtt.Client(identifier="bench-bare-sub", **common) as sub,
        aiomqtt.Client(identifier="bench-bare-pub", **common) as pub,
    ):
        await sub.subscribe(where, qos=1)

        async def consume() -> None:
            received = 0
            async for message in sub.messages:
                if not isinstance(message.payload, bytes) or len(message.payload) != len(payload):
                    raise BusError("bare aiomqtt reference received a wrong payload")
                received += 1
                if received == count:
                    return

        consumer = asyncio.create_task(consume())
        start = asyncio.get_running_loop().time()
        for _ in range(count):
            await pub.publish(where, payload, qos=1)
        await asyncio.wait_for(consumer, timeout=60 + len(payload) * count / 1e6)
        return asyncio.get_running_loop().time() - start
