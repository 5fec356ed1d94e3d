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
  bounded inbox of :class:`~emo_mqtt.bus.base.Bus`; when it fills, the fast client
  removes its socket reader from the event loop, so TCP flow control pushes back and the
  broker keeps the messages (the public-API fallback can only hold them in memory).
* **A last will** published (retained) by the broker when the node dies.
* **Fewer copies and wake-ups than paho and aiomqtt**, and no delayed-ACK stalls against
  a broker that leaves Nagle's algorithm on (a stock Mosquitto): the fast client of
  ``emo_mqtt/bus/fastpath.py``, the one module that touches private members of aiomqtt
  and paho. It is used when the installed releases still have those members as
  expected (:func:`fast_paths_problems`) and ``EMO_MQTT_PLAIN`` is unset; otherwise
  :class:`_PlainLink` carries the same traffic through aiomqtt's public API only.
* **A chunked message ends without a delayed-ACK stall**, with either client: its last
  frame goes once the others are acknowledged (:meth:`MqttBus._publish_frames`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable
from importlib.metadata import version as _dist_version
from typing import Any, Literal
from typing import Protocol as _Interface

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from emo_mqtt.broker.url import BrokerURL, parse_broker_url
from emo_mqtt.bus import fastpath
from emo_mqtt.bus.base import Bus, BusOptions, Message
from emo_mqtt.bus.fastpath import Ack, ConnectionLost
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
#: How long a graceful disconnect may take before the socket is simply dropped.
_DISCONNECT_S = 5.0
# paho's answers to a publish on a connection that is gone.
_LOST_CODES = {MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST}


class _Link(_Interface):
    """One live connection as :class:`MqttBus` uses it: the fast client or the plain one."""

    @property
    def client(self) -> aiomqtt.Client: ...

    @property
    def lost(self) -> asyncio.Future[None]: ...

    def start(self) -> None: ...

    def send(self, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> Ack: ...

    def forget(self, ack: Ack) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def abandon(self) -> None: ...


class _PlainLink:
    """A connection through aiomqtt's public API only: the fallback of the fast client.

    Slower (a task per publish and per received message, paho's copies) and without TCP
    backpressure: while the bus's inbox is full, incoming messages wait in memory here
    instead of at the broker. ``emo bench bus --plain`` measures it.
    """

    def __init__(
        self,
        deliver: Callable[[str, bytes | bytearray, int, bool], None],
        paused: Callable[[], bool],
        **kwargs: Any,
    ) -> None:
        self._client = aiomqtt.Client(**kwargs)
        self._deliver = deliver
        self._paused = paused
        self._held: deque[aiomqtt.Message] = deque()
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        self._sends: dict[Ack, asyncio.Task[None]] = {}

    @property
    def client(self) -> aiomqtt.Client:
        return self._client

    @property
    def lost(self) -> asyncio.Future[None]:
        return self._lost

    def start(self) -> None:
        # aiomqtt's message iterator is its one public sign that the connection ended.
        self._reader = asyncio.create_task(self._read())
        self._lost.add_done_callback(self._stop)

    async def _read(self) -> None:
        try:
            async for message in self._client.messages:
                self._held.append(message)
                self.resume()
        except aiomqtt.MqttError as exc:
            if not self._lost.done():
                self._lost.set_exception(exc)
        except asyncio.CancelledError:
            pass
        if not self._lost.done():
            self._lost.set_result(None)

    def _stop(self, lost: asyncio.Future[None]) -> None:
        if not lost.cancelled():
            lost.exception()  # why the connection ended is read by MqttBus, if at all
        if self._reader is not None:
            self._reader.cancel()
        for ack, task in list(self._sends.items()):
            task.cancel()
            if not ack.future.done():
                ack.future.set_exception(ConnectionLost())

    def send(self, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> Ack:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack = Ack(future, -1)
        if self._lost.done():
            future.set_exception(ConnectionLost())
            return ack
        task = asyncio.create_task(
            self._client.publish(topic, payload, qos, retain, timeout=math.inf)
        )
        self._sends[ack] = task
        task.add_done_callback(lambda done: self._sent(ack, done))
        return ack

    def _sent(self, ack: Ack, task: asyncio.Task[None]) -> None:
        self._sends.pop(ack, None)
        if ack.future.done():
            return
        if task.cancelled() or self._lost.done():
            ack.future.set_exception(ConnectionLost())
        elif (exc := task.exception()) is not None:
            if getattr(exc, "rc", None) in _LOST_CODES:  # before the reader saw it
                ack.future.set_exception(ConnectionLost())
            else:
                ack.future.set_exception(BusError(f"publish failed: {exc}"))
        else:
            ack.future.set_result(None)

    def forget(self, ack: Ack) -> None:
        task = self._sends.pop(ack, None)
        if task is not None:
            task.cancel()

    def pause(self) -> None:
        """Nothing to stop: messages wait in :attr:`_held` until :meth:`resume`."""

    def resume(self) -> None:
        while self._held and not self._paused():
            m = self._held.popleft()
            payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
            self._deliver(m.topic.value, payload, m.qos, m.retain)

    def abandon(self) -> None:
        """Nothing to close through the public API: the socket goes with the client."""


@functools.cache
def fast_paths_problems() -> list[str]:
    """Why the fast client cannot be used with the installed aiomqtt/paho (empty: it can).

    Checked once per process, from within a running event loop (aiomqtt's client takes
    it when built). Do not modify the list returned.
    """
    return fastpath.problems(aiomqtt.Client("localhost"), _AIOMQTT_VERSION)


_FastClient = fastpath.fast_client_class(aiomqtt.Client)
_AIOMQTT_VERSION = _dist_version("aiomqtt")


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
        plain: bool | None = None,
    ) -> None:
        """``plain``: carry traffic through aiomqtt's public API only, not the fast client
        of ``emo_mqtt/bus/fastpath.py``; None (default) means the environment variable
        ``EMO_MQTT_PLAIN`` decides (set and not ``0``: plain). The fast client stands down
        on its own, with a warning, when the installed aiomqtt or paho differ from what
        it relies on."""
        super().__init__(client_id, options)
        if plain is None:
            plain = os.environ.get("EMO_MQTT_PLAIN", "0") not in {"", "0"}
        self.plain = plain
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
        self._client: _Link | None = None
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

    @property
    def reconnecting(self) -> bool:
        """True from the loss of a connection until the supervisor has noticed it.

        Publishes in that window wait for the next connection instead of failing.
        """
        return self._up.is_set() and not self.connected

    @property
    def pending_acks(self) -> int:
        """Publishes on the current connection still waiting for their acknowledgement."""
        client = self._client
        return 0 if client is None else fastpath.pending_acks(client.client)

    def sever(self, *, reconnect: bool = True) -> None:
        """Cut the TCP connection as a crash or a network failure would.

        No DISCONNECT is sent, so the broker publishes the will and keeps the session.
        ``reconnect=False`` also stops the bus from reconnecting: a crashed process. For fault
        injection (tests, ``emo run``'s scenario replay); :meth:`close` is the clean way out.
        """
        if not reconnect:
            self._closed = True
        client = self._client
        if client is None or client.lost.done():
            return
        sock = fastpath.paho_socket(client.client)
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone: nothing left to cut
                sock.shutdown(socket.SHUT_RDWR)

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
                f"could not connect to {self.url} within {wait:g} s: {self._last_error!r}"
            ) from None
        except (BusError, asyncio.CancelledError):
            # Cancelled mid-connect too (Ctrl-C): no supervisor is left reconnecting.
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect gracefully (the broker does not publish the will) and stop reconnecting."""
        self._closed = True
        client = self._client
        if client is not None and not client.lost.done():
            await self._disconnect(client)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._client = None
        await super().close()

    def _make_client(self, protocol: Literal["5", "3.1.1"]) -> _Link:
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
        if not self.plain:
            found = fast_paths_problems()
            if found:
                log.warning(
                    "%s: the installed aiomqtt/paho differ from what the bus's fast client "
                    "relies on (%s); using aiomqtt's public API only",
                    self.client_id,
                    "; ".join(found),
                )
                self.plain = True
        if self.plain:
            return _PlainLink(self._deliver_frame, self._is_paused, **kwargs)
        link: _Link = _FastClient(self._deliver_frame, self._is_paused, **kwargs)
        return link

    def _deliver_frame(
        self, topic: str, payload: bytes | bytearray, qos: int, retain: bool
    ) -> None:
        self._deliver(Message(topic, payload, qos, retain))

    def _is_paused(self) -> bool:
        return self._paused

    async def _supervise(self) -> None:
        delay = self.reconnect_min_s
        protocol: Literal["5", "3.1.1"] = "3.1.1" if self.protocol == "3.1.1" else "5"
        first = True
        while not self._closed:
            client = self._make_client(protocol)
            if protocol == "5" and self.protocol == "auto" and self.negotiated is None:
                client.client.timeout = min(_MQTT5_PROBE_S, self.connect_timeout_s / 2)
            try:
                await client.client.__aenter__()
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
                client.abandon()
                # Some 3.1.1 brokers just close the socket on a protocol version they don't
                # know: until one connection succeeds, alternate versions between attempts.
                if self.negotiated is None and self.protocol == "auto":
                    protocol = "3.1.1" if protocol == "5" else "5"
            else:
                client.client.timeout = self.connect_timeout_s
                delay = self.reconnect_min_s
                self.negotiated = protocol
                await self._serve(client, first)
                first = False
            if self._closed:
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max_s)

    async def _serve(self, client: _Link, first: bool) -> None:
        """Run one live connection until it ends."""
        self._client = client
        client.start()
        try:
            if self._subscriptions:
                await client.client.subscribe(list(self._subscriptions.items()))
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
            # Disconnects, or (the connection already gone) releases aiomqtt's lock.
            await self._disconnect(client)
        if not self._closed:
            log.warning("%s: connection to %s lost: %r", self.client_id, self.url, self._last_error)

    async def _disconnect(self, client: _Link) -> None:
        """aiomqtt's graceful disconnect waits for the broker to close with no time limit:
        bounded here, so that a bus closed in a bad moment (a cancel that lands between
        CONNECT and CONNACK, on Ctrl-C under load) cannot hang close() or the event loop's
        shutdown. Past the bound, the socket is dropped."""
        try:
            async with asyncio.timeout(_DISCONNECT_S):
                await client.client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, TimeoutError, OSError):
            client.abandon()

    async def _live_client(self) -> _Link:
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
            await client.client.subscribe(topic_filter, qos)
        except aiomqtt.MqttError as exc:
            if not client.lost.done():
                raise BusError(f"subscribe to {topic_filter} failed: {exc}") from exc

    async def _unsubscribe(self, topic_filter: str) -> None:
        client = self._client
        if client is not None and not client.lost.done():
            with contextlib.suppress(aiomqtt.MqttError):
                await client.client.unsubscribe(topic_filter)

    async def _publish_frames(
        self, topic: str, chunks: list[bytearray], qos: int, in_flight: int
    ) -> None:
        # A broker that leaves Nagle's algorithm on (stock Mosquitto: no set_tcp_nodelay)
        # holds each PUBACK until the one before it is acknowledged at the TCP level. While
        # frames are going out, they carry that ACK; after the last one, our kernel delays
        # it (up to 40 ms on Linux), and the message's last PUBACK waits for it. Sending the
        # last frame only once the others are acknowledged lets it carry the ACK: measured,
        # this removes a stall of about 40 ms per chunked message (docs/performance.md).
        await super()._publish_frames(topic, chunks[:-1], qos, in_flight)
        await self._publish_chunk(topic, chunks[-1], qos)

    async def _publish_chunk(self, topic: str, chunk: bytearray, qos: int) -> None:
        await self._publish_frame(topic, chunk, qos, False)  # paho takes it without a copy

    async def _publish_frame(
        self, topic: str, frame: bytes | bytearray, qos: int, retain: bool
    ) -> None:
        while True:
            client = await self._live_client()
            try:
                ack = client.send(topic, frame, qos, retain)
            except BusError as exc:
                if not client.lost.done():
                    raise BusError(f"publish to {topic} failed: {exc}") from exc
            else:
                try:
                    await ack.future
                    return
                except ConnectionLost:
                    pass
                finally:
                    if ack.future.cancelled():  # our deadline passed first
                        client.forget(ack)
            # The connection went down before the broker acknowledged: publish again on the
            # next one (at-least-once). Never await client.lost itself: it may hold the
            # exception that ended the connection.
            self.stats.republished_frames += 1
            await asyncio.wait({client.lost}, timeout=0.2)

    def _pause_reading(self) -> None:
        if self._client is not None:
            self._client.pause()

    def _resume_reading(self) -> None:
        if self._client is not None:
            self._client.resume()


def _bare_options(url: str) -> dict[str, Any]:
    target = parse_broker_url(url)
    return {
        "hostname": target.host,
        "port": target.port,
        "username": target.username,
        "password": target.password,
        "protocol": aiomqtt.ProtocolVersion.V5,
        "timeout": 60,
    }


async def bare_aiomqtt_accepts(url: str, where: str, size: int) -> bool:
    """Whether the broker takes (acknowledges) one ``size``-byte publish at QoS 1.

    A broker whose packet cap is below it drops the connection instead, or paho refuses
    the packet (MQTT 5 announces the cap): either way, False. For ``emo bench bus``.
    """
    try:
        async with aiomqtt.Client(identifier="bench-bare-probe", **_bare_options(url)) as pub:
            await pub.publish(where, bytes(size), qos=1, timeout=5 + size / 10e6)
    except (aiomqtt.MqttError, TimeoutError):
        return False
    return True


async def bare_aiomqtt_transfer(
    url: str, where: str, payload: bytes, count: int, frame_size: int | None = None
) -> float:
    """Reference for ``emo bench bus``: seconds to move ``count`` raw payloads at QoS 1.

    Two plain aiomqtt clients, no codec: the publisher awaits each publish (as aiomqtt's
    documentation does) and the clock stops when the subscriber has them all. With
    ``frame_size``, each payload goes as consecutive publishes of at most that many bytes
    (for a broker that caps packets below the payload). It lives here because this is the
    one module that imports aiomqtt.
    """
    try:
        return await _bare_transfer(_bare_options(url), where, payload, count, frame_size)
    except (aiomqtt.MqttError, TimeoutError) as exc:
        raise BusError(
            f"bare aiomqtt reference failed ({exc!r}); a broker that caps packets below "
            f"{len(payload)} bytes refuses it: start one without the cap or pass --no-baseline"
        ) from exc


async def _bare_transfer(
    common: dict[str, Any], where: str, payload: bytes, count: int, frame_size: int | None
) -> float:
    step = frame_size or len(payload)
    frames = [payload[i : i + step] for i in range(0, len(payload), step)]
    async with (
        aiomqtt.Client(identifier="bench-bare-sub", **common) as sub,
        aiomqtt.Client(identifier="bench-bare-pub", **common) as pub,
    ):
        await sub.subscribe(where, qos=1)

        async def consume() -> None:
            received = 0
            expected = count * len(frames)
            async for message in sub.messages:
                if not isinstance(message.payload, bytes) or len(message.payload) > step:
                    raise BusError("bare aiomqtt reference received a wrong payload")
                received += 1
                if received == expected:
                    return

        consumer = asyncio.create_task(consume())
        start = asyncio.get_running_loop().time()
        for _ in range(count):
            for frame in frames:
                await pub.publish(where, frame, qos=1)
        await asyncio.wait_for(consumer, timeout=60 + len(payload) * count / 1e6)
        return asyncio.get_running_loop().time() - start
