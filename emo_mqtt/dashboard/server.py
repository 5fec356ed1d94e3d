"""The dashboard's server: one MQTT subscriber, one small HTTP server, both on asyncio.

Debian's Mosquitto has no websockets listener, so the page cannot talk MQTT itself: this
server subscribes to ``emo/+/telemetry/#`` (statuses, metrics, run states), keeps a
:class:`~emo_mqtt.dashboard.state.FleetState`, and serves

- ``GET /``: the page, ``GET /static/<file>``: its script and style (from the package),
- ``GET /api/state``: the snapshot as JSON,
- ``GET /api/search?run=<run>&q=<text>``: the run's nodes whose id contains the text (the
  page's search box: a big fleet's snapshot carries counts, not one entry per node),
- ``GET /events``: Server-Sent Events, the snapshot each time it changes (at most 4/s),
- ``GET /metrics``: Prometheus exposition text.

Requests are bounded (8 KiB of head, 10 s to send it); anything malformed gets a 4xx and
never disturbs the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from emo_mqtt.bus import Bus, open_bus
from emo_mqtt.dashboard.state import FleetState, prometheus_text
from emo_mqtt.errors import EmoError
from emo_mqtt.topics import telemetry_filter

log = logging.getLogger("emo_mqtt.dashboard")

MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT_S = 10.0
#: Minimum seconds between two pushes to one SSE client.
PUSH_INTERVAL_S = 0.25
#: Seconds between SSE keep-alive comments.
KEEPALIVE_S = 15.0
#: Open HTTP connections served at once (SSE streams stay open); more are closed at once.
MAX_CONNECTIONS = 256
#: Seconds between two looks at the broker connection, for SSE clients.
LINK_CHECK_S = 2.0
SUBSCRIPTIONS = (telemetry_filter(),)
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Hub:
    """The state, a cached JSON rendering of it, and a change signal for SSE clients."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.state = FleetState()
        self.bus: Bus | None = None
        self._changed = asyncio.Event()
        self._json: tuple[tuple[int, bool], bytes] | None = None

    def ingest(self, topic: str, payload: bytes | bytearray) -> None:
        try:
            took = self.state.ingest(topic, payload)
        except Exception:
            # FleetState counts bad input and never raises on it; should a bug make it raise,
            # one message must still not end the subscriber (and with it the dashboard).
            log.exception("dashboard: message on %s not taken", topic)
            self.state.malformed += 1
            return
        if took:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def changed(self) -> asyncio.Event:
        """An event set at the next change of the state."""
        return self._changed

    @property
    def connected(self) -> bool:
        """Whether the subscriber is connected to the broker right now."""
        return self.bus is not None and self.bus.connected

    def key(self) -> tuple[int, bool]:
        """What a snapshot depends on: when it changes, pages need a new one."""
        return self.state.version, self.connected

    def snapshot_json(self) -> bytes:
        key = self.key()
        if self._json is None or self._json[0] != key:
            snap = self.state.snapshot()
            snap["broker"] = self.broker_url
            snap["connected"] = key[1]
            self._json = (key, json.dumps(snap, allow_nan=False).encode())
        return self._json[1]

    def metrics_text(self) -> bytes:
        return prometheus_text(self.state.snapshot()).encode()


def _static(name: str) -> bytes | None:
    """A file of the package's ``static`` folder, or ``None`` (no path tricks)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    try:
        return resources.files("emo_mqtt.dashboard").joinpath("static", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return None


def _index(hub: Hub) -> bytes:
    """The page, with the current snapshot inlined so that it renders before any request.

    Pages opened by headless browsers (``--dump-dom``, ``--screenshot``) are captured when
    they have loaded, before the first event arrives: the inlined state makes what they
    show deterministic. ``<`` is escaped so that the JSON cannot close the script element.
    """
    page = _static("index.html")
    if page is None:
        return b"<!doctype html><p>index.html is missing from the package</p>"
    inline = hub.snapshot_json().replace(b"<", b"\\u003c")
    return page.replace(
        b"<!--STATE-->",
        b'<script id="initial-state" type="application/json">' + inline + b"</script>",
        1,
    )


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Method and path of a request; :class:`_BadRequest` for anything malformed."""
    try:
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "request head too large") from None
    except asyncio.IncompleteReadError as exc:
        if len(exc.partial) > MAX_HEAD_BYTES:
            raise _BadRequest(431, "request head too large") from None
        raise _BadRequest(400, "incomplete request") from None
    except TimeoutError:
        raise _BadRequest(408, "request timeout") from None
    if len(head) > MAX_HEAD_BYTES:
        raise _BadRequest(431, "request head too large")
    try:
        line = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise _BadRequest(400, "malformed request line")
    method, target = parts[0], parts[1]
    if method not in ("GET", "HEAD"):
        raise _BadRequest(405, f"method {method[:16]!r} not allowed")
    return method, target.split("#", 1)[0]


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, head_only: bool
) -> None:
    headers = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer.write(headers if head_only else headers + body)
    await writer.drain()


async def _events(hub: Hub, writer: asyncio.StreamWriter) -> None:
    """Stream the snapshot as Server-Sent Events until the client goes away."""
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
        b"Connection: close\r\n\r\nretry: 2000\n\n"
    )
    loop = asyncio.get_running_loop()
    sent: tuple[int, bool] | None = None
    quiet_since = loop.time()
    while True:
        changed = hub.changed()
        if hub.key() != sent:
            sent = hub.key()
            writer.write(b"event: state\ndata: " + hub.snapshot_json() + b"\n\n")
            await writer.drain()
            quiet_since = loop.time()
            await asyncio.sleep(PUSH_INTERVAL_S)
            continue
        try:
            # Wake up now and then: a lost broker connection changes no message count.
            async with asyncio.timeout(LINK_CHECK_S):
                await changed.wait()
        except TimeoutError:
            if loop.time() - quiet_since >= KEEPALIVE_S:
                writer.write(b": keep-alive\n\n")
                await writer.drain()
                quiet_since = loop.time()


async def _handle(hub: Hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP connection: one request, then close. Never raises."""
    try:
        try:
            method, target = await _read_head(reader)
        except _BadRequest as exc:
            await _respond(writer, exc.status, f"{exc}\n".encode(), "text/plain", False)
            return
        head_only = method == "HEAD"
        path, _, query = target.partition("?")
        if path == "/events" and not head_only:
            await _events(hub, writer)
            return
        if path in ("/", "/index.html"):
            body, ctype, status = _index(hub), STATIC_TYPES[".html"], 200
        elif path == "/api/state":
            body, ctype, status = hub.snapshot_json(), "application/json", 200
        elif path == "/api/search":
            try:
                args = parse_qs(query, max_num_fields=4)
            except ValueError:
                args = {}
            hits = hub.state.search(args.get("run", [""])[0], args.get("q", [""])[0])
            body, ctype, status = json.dumps(hits).encode(), "application/json", 200
        elif path == "/metrics":
            body, ctype, status = hub.metrics_text(), "text/plain; version=0.0.4", 200
        elif path.startswith("/static/") and (found := _static(path[len("/static/") :])):
            suffix = path[path.rfind(".") :]
            body, ctype, status = found, STATIC_TYPES.get(suffix, "application/octet-stream"), 200
        else:
            body, ctype, status = b"not found\n", "text/plain", 404
        await _respond(writer, status, body, ctype, head_only)
    except (ConnectionError, asyncio.CancelledError):
        pass
    except Exception:  # a bug must not take the dashboard down
        log.exception("dashboard: request failed")
    finally:
        writer.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await writer.wait_closed()


async def _subscribe(hub: Hub) -> None:
    """Feed the hub from the broker until cancelled (the bus reconnects by itself)."""
    bus = open_bus(hub.broker_url, f"dashboard-{secrets.token_hex(4)}", clean_start=True)
    async with bus:
        for topic_filter in SUBSCRIPTIONS:
            await bus.subscribe(topic_filter)
        hub.bus = bus
        async for message in bus.messages():
            hub.ingest(message.topic, message.payload)


async def serve_dashboard(
    broker_url: str,
    host: str = "127.0.0.1",
    port: int = 8050,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Subscribe to the fleet on ``broker_url`` and serve the dashboard on ``host:port``.

    ``ready`` is set once both the subscription and the HTTP listener are up; the server
    runs until ``stop`` is set (or the task is cancelled).
    """
    hub = Hub(broker_url)
    feeder = asyncio.create_task(_subscribe(hub), name="dashboard:mqtt")
    clients: set[asyncio.Task[Any]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(clients) >= MAX_CONNECTIONS:
            writer.close()  # too many open connections (SSE clients): refuse this one
            return
        if task is not None:
            clients.add(task)
        try:
            await _handle(hub, reader, writer)
        except asyncio.CancelledError:
            pass  # shutting down: asyncio's stream callback must not see a cancelled task
        finally:
            if task is not None:
                clients.discard(task)

    stopper = asyncio.create_task(stop.wait() if stop is not None else asyncio.Event().wait())
    try:
        server = await asyncio.start_server(on_client, host, port, limit=MAX_HEAD_BYTES)
    except OSError:
        feeder.cancel()
        stopper.cancel()
        await asyncio.gather(feeder, stopper, return_exceptions=True)
        raise
    try:
        while hub.bus is None:
            if feeder.done():
                feeder.result()  # raises the connection error
                raise EmoError("dashboard: the MQTT subscriber ended")
            await asyncio.sleep(0.02)
        if ready is not None:
            ready.set()
        await asyncio.wait([feeder, stopper], return_when=asyncio.FIRST_COMPLETED)
        if feeder.done():
            feeder.result()
    finally:
        server.close()
        for task in list(clients):
            task.cancel()
        feeder.cancel()
        stopper.cancel()
        await asyncio.gather(feeder, stopper, *clients, return_exceptions=True)
        with contextlib.suppress(Exception):
            await server.wait_closed()


def run_dashboard(broker_url: str, host: str = "127.0.0.1", port: int = 8050) -> int:
    """``emo dashboard``: serve until Ctrl-C; the exit status."""
    ready = asyncio.Event()

    async def main() -> None:
        task = asyncio.create_task(serve_dashboard(broker_url, host, port, ready=ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            shown = f"[{host}]" if ":" in host else host
            print(
                f"dashboard: http://{shown}:{port}/ (broker {broker_url}); Ctrl-C to stop",
                flush=True,
            )
        waiter.cancel()
        await task

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # the HTTP port: in use, not ours to bind
        # One line and exit status 2 from the command line, like every usage error.
        reason = exc.strerror or str(exc)
        raise EmoError(f"dashboard: cannot serve on {host}:{port}: {reason}") from exc
    except EmoError as exc:
        print(f"emo dashboard: {exc}", flush=True)
        return 1
    return 0
