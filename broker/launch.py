"""Start and stop the MQTT broker that emo-mqtt runs against in development and tests.

Two brokers are supported:

* **Mosquitto** (preferred): a subprocess running the project's ``mosquitto.conf``,
  rendered into a run directory that also holds its persistence database and its log.
* **amqtt** (fallback when no ``mosquitto`` binary is installed): the embedded pure-Python
  broker, MQTT 3.1.1 only and without persistence, served from a background thread with
  its own event loop so that sync and async callers can both use it.

:class:`BrokerHandle` is *synchronous* on purpose: pytest fixtures and the start-up code
of async programs both use it, and a blocking start of a few tens of milliseconds is
simpler than two APIs.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import functools
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import version as _dist_version
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal, Protocol

from emo_mqtt.errors import BrokerError, ConfigError

from .url import BrokerURL, parse_broker_url

__all__ = [
    "CONFIG_TEMPLATE",
    "BrokerHandle",
    "BrokerKind",
    "find_free_port",
    "find_mosquitto",
    "mosquitto_version",
    "render_config",
    "run_foreground",
]

BrokerKind = Literal["auto", "mosquitto", "amqtt"]

#: The configuration template the project ships (see its header for the placeholders).
CONFIG_TEMPLATE = Path(__file__).with_name("mosquitto.conf")

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_LOG_TAIL_LINES = 25
INSTALL_HINT = (
    "install Mosquitto (Debian/Ubuntu: apt-get install -y mosquitto; macOS: brew install "
    "mosquitto); without it the demo falls back to the embedded amqtt broker (MQTT 3.1.1 only)"
)

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers
def find_mosquitto() -> Path | None:
    """Path of the ``mosquitto`` binary, or None.

    Debian installs it in /usr/sbin, which is not on a non-root user's PATH.
    """
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


@functools.cache
def mosquitto_version(binary: Path) -> str:
    """Version of a Mosquitto binary (``"2.0.11"``), or ``"unknown"``."""
    try:  # `mosquitto -h` prints "mosquitto version X.Y.Z" first and exits with 3
        out = subprocess.run(
            [str(binary), "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.splitlines()[0].split() if out.strip() else []
    return first[2] if len(first) >= 3 and first[1] == "version" else "unknown"


class _PortInUse(BrokerError):
    """The broker could not bind its port: someone else holds it."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the kernel picks it).

    There is an unavoidable race until the broker binds it; the ephemeral range makes a
    collision unlikely, and :meth:`BrokerHandle.start` retries auto-picked ports.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as_user() -> str:
    # Mosquitto drops root privileges to the `mosquitto` user unless told otherwise, and
    # that user cannot write our run directory. Keeping the current user is a no-op when
    # not root.
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # uid without a passwd entry (containers): only root matters
        return "root" if os.geteuid() == 0 else "nobody"


DEFAULT_MAX_PACKET_SIZE = 2162688  # 2 MiB + 64 KiB: see broker/mosquitto.conf


def render_config(
    port: int,
    bind_address: str,
    persistence_dir: Path,
    template: Path | None = None,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
) -> str:
    """Fill the Mosquitto config template (``{port}``, ``{bind_address}``...).

    A plain Mosquitto config without placeholders (and without braces) renders as is.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"broker port {port} out of range 1-65535")
    if not 20 <= max_packet_size <= 268435455:  # Mosquitto's bounds; 268435455 is MQTT's max
        raise ConfigError(f"max_packet_size {max_packet_size} out of range 20-268435455")
    values = {
        "port": str(port),
        "bind_address": bind_address,
        "persistence_dir": str(persistence_dir.resolve()),
        "user": _run_as_user(),
        "max_packet_size": str(max_packet_size),
    }
    for name, value in values.items():
        # Mosquitto splits option values on whitespace: a space would silently truncate.
        if not value or any(ch.isspace() for ch in value):
            raise ConfigError(f"broker config value {name}={value!r} is empty or has spaces")
    path = template or CONFIG_TEMPLATE
    try:
        return path.read_text(encoding="utf-8").format(**values)
    except OSError as exc:
        raise ConfigError(f"cannot read broker config template {path}: {exc}") from exc
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"bad placeholder in broker config template {path}: {exc}") from exc


def _log_tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.25):
            return True
    except OSError:
        return False


def _check_port_free(host: str, port: int) -> None:
    # Without this, the start-up probe could connect to whoever holds the port and take
    # them for our broker, in the few ms before the broker exits with EADDRINUSE.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the brokers do: a TIME_WAIT left by our previous run does not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            cls = _PortInUse if exc.errno == errno.EADDRINUSE else BrokerError
            raise cls(f"cannot start a broker on {_host_port(host, port)}: {exc.strerror}") from exc


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Brokers still running when the interpreter exits (an unhandled exception outside any
# `with`, a forgotten stop()) are stopped by atexit, so we never leave orphans behind.
_RUNNING: set[_Backend] = set()


@atexit.register
def _stop_leftovers() -> None:
    for backend in list(_RUNNING):
        with contextlib.suppress(Exception):
            backend.stop()


_libc: Any = None  # ctypes handle on the C library, for prctl()


def _preexec() -> Callable[[], None] | None:
    """A preexec_fn that ties the broker's life to ours (Linux, main thread only)."""
    global _libc
    # The death signal fires when the *thread* that forked exits, so only use it from
    # the main thread; threads of a pool could exit and take the broker with them.
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    if _libc is None:  # loaded here: the child must not allocate or import anything
        _libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child, between fork and exec
        # PR_SET_PDEATHSIG: SIGTERM the broker (which then saves its database) if we are
        # SIGKILLed, e.g. by a CI timeout, so no Mosquitto outlives its test run.
        _libc.prctl(1, signal.SIGTERM)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return die_with_parent


#: Open files wanted for the broker (and us): one per client connection, and a fleet of
#: ``fleet.devices`` holds one connection per device.
WANTED_OPEN_FILES = 65_536


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES, needed: int = 0) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (at most the hard
    limit); the limit now in force. Children (the broker, worker processes) inherit it.

    A stock soft limit of 1,024 lets Mosquitto take about a thousand clients before it
    refuses connections ("Too many open files"): a fleet of a thousand devices needs more.
    When the limit stays below ``needed`` (the hard limit is lower), warns, naming the fix.
    """
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            _log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        _log.warning(
            "open files limited to %d (hard limit %s), but this fleet needs about %d "
            "connections to the broker: connections beyond the limit are refused; raise "
            "the hard limit (ulimit -Hn as root, or LimitNOFILE= in a systemd unit)",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            needed,
        )
    return int(soft) if soft != resource.RLIM_INFINITY else wanted


# --------------------------------------------------------------------------- backends
class _Backend(Protocol):
    def start(self, host: str, port: int, workdir: Path) -> None: ...
    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None: ...
    def is_running(self) -> bool: ...
    def describe(self, host: str, port: int) -> str: ...


class _MosquittoBackend:
    def __init__(self, binary: Path, template: Path | None, max_packet_size: int) -> None:
        self.binary = binary
        self.template = template
        self.max_packet_size = max_packet_size
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: IO[bytes] | None = None

    def start(self, host: str, port: int, workdir: Path) -> None:
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        text = render_config(port, host, workdir / "data", self.template, self.max_packet_size)
        conf.write_text(text, encoding="utf-8")
        log_path = workdir / "mosquitto.log"
        self._logf = log_path.open("ab")  # append: a restart keeps the previous run's log
        offset = self._logf.tell()
        raise_open_files_limit()  # inherited by the broker: one file per connection
        try:
            self.proc = subprocess.Popen(
                [str(self.binary), "-c", str(conf)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it in order
                preexec_fn=_preexec(),  # only prctl(): see _preexec
            )
        except OSError as exc:
            self.stop()
            raise BrokerError(f"cannot run {self.binary}: {exc}") from exc
        _RUNNING.add(self)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                tail = _log_tail(log_path, offset)
                cls = _PortInUse if "address already in use" in tail.lower() else BrokerError
                raise cls(f"mosquitto exited with code {rc} during start-up; log:\n{tail}")
            if port_open(host, port) and self.proc.poll() is None:
                return
            time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise BrokerError(
            f"mosquitto did not accept connections on {_host_port(host, port)} within "
            f"{START_TIMEOUT_S:.0f} s; log:\n{_log_tail(log_path, offset)}"
        )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)  # SIGTERM: Mosquitto saves its persistence db, then exits
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _log.warning("mosquitto pid %d ignored %s; killing it", proc.pid, sig.name)
                proc.kill()
                proc.wait()
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self, host: str, port: int) -> str:
        proc = self.proc
        alive = proc is not None and proc.poll() is None
        state = f"started by emo, pid {proc.pid}" if proc and alive else "not running"
        ver = mosquitto_version(self.binary)
        return f"Mosquitto {ver} on {_host_port(host, port)} ({state})"


_AMQTT_AUTH = "amqtt.plugins.authentication.AnonymousAuthPlugin"


class _AmqttBackend:
    """amqtt's Broker on a private event loop in a daemon thread."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._log_handler: logging.Handler | None = None

    def start(self, host: str, port: int, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "amqtt.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        # amqtt logs through the `amqtt` logger; keep its warnings for the error message.
        self._log_handler = logging.FileHandler(log_path, encoding="utf-8")
        self._log_handler.setLevel(logging.WARNING)
        logging.getLogger("amqtt").addHandler(self._log_handler)
        self._ready.clear()
        self._error = None
        config: dict[str, Any] = {
            # "host:port" also for IPv6: amqtt keeps brackets in "[::1]:port" and then
            # cannot resolve the address, but it splits "::1:port" at the last colon.
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            # Only anonymous auth: the defaults also publish $SYS every 20 s and log
            # every packet, noise we do not want in tests.
            "plugins": {_AMQTT_AUTH: {"allow_anonymous": True}},
        }
        self.thread = threading.Thread(
            target=asyncio.run, args=(self._serve(config),), name=f"emo-amqtt-{port}", daemon=True
        )
        self.thread.start()
        _RUNNING.add(self)
        ok = self._ready.wait(START_TIMEOUT_S) and self._error is None
        ok = ok and wait_until(lambda: port_open(host, port), START_TIMEOUT_S)
        if not ok:
            error = self._error
            self.stop()
            tail = _log_tail(log_path, offset)
            in_use = "address already in use" in f"{error}{tail}".lower()
            cls = _PortInUse if in_use else BrokerError
            raise cls(f"embedded amqtt broker failed to start: {error}; log:\n{tail}") from error

    async def _serve(self, config: dict[str, Any]) -> None:
        from amqtt.broker import Broker  # imported late: heavy, and unused with Mosquitto

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            broker = Broker(config)  # must be built inside the loop it will run on
            await broker.start()
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopping.wait()
        try:
            await broker.shutdown()
        except Exception:  # an exception escaping a thread is only printed; log it instead
            _log.exception("embedded amqtt broker failed to shut down cleanly")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        del sig  # a thread cannot be killed; every stop is a clean shutdown
        _RUNNING.discard(self)
        loop, stopping, thread = self._loop, self._stopping, self.thread
        if loop is not None and stopping is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            thread.join(STOP_TIMEOUT_S)
            if thread.is_alive():
                _log.warning("embedded amqtt broker did not stop within %.0f s", STOP_TIMEOUT_S)
        self.thread = self._loop = self._stopping = None
        if self._log_handler is not None:
            logging.getLogger("amqtt").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self._error is None

    def describe(self, host: str, port: int) -> str:
        state = "in-process thread" if self.is_running() else "not running"
        return (
            f"amqtt {_dist_version('amqtt')} embedded broker, MQTT 3.1.1 only, on "
            f"{_host_port(host, port)} (started by emo, {state})"
        )


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- public API
class BrokerHandle:
    """A broker this process starts, owns and stops: ``with BrokerHandle() as b: b.url``.

    ``kind`` picks the broker: ``"mosquitto"`` (a subprocess; fails if not installed),
    ``"amqtt"`` (embedded, MQTT 3.1.1, no persistence) or ``"auto"`` (Mosquitto when its
    binary is found, else amqtt). ``port=None`` picks a free port now, so :attr:`url` is
    known before :meth:`start`. The rendered config, persistence database and log live in
    ``workdir``; by default a fresh temporary directory, removed by :meth:`close`.
    ``config`` replaces the shipped Mosquitto config template (same placeholders).
    ``max_packet_size`` fills the template's cap on MQTT packets (Mosquitto only).
    """

    def __init__(
        self,
        kind: BrokerKind = "auto",
        port: int | None = None,
        host: str = "127.0.0.1",
        workdir: Path | None = None,
        *,
        config: Path | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        binary = find_mosquitto()
        if kind not in ("auto", "mosquitto", "amqtt"):
            raise ConfigError(f"unknown broker kind {kind!r}: use auto, mosquitto or amqtt")
        if kind == "mosquitto" and binary is None:
            raise BrokerError(f"no mosquitto binary found: {INSTALL_HINT}")
        self.kind: str = "mosquitto" if kind != "amqtt" and binary is not None else "amqtt"
        # A bad host or port fails here, as a ConfigError, not later as a socket error.
        parse_broker_url(str(BrokerURL("mqtt", host, 1883 if port is None else port)))
        self.host = host
        self._auto_port = port is None
        try:
            self.port: int = find_free_port(host) if port is None else port
        except OSError as exc:
            raise BrokerError(f"cannot listen on {host}: {exc.strerror or exc}") from exc
        self.workdir: Path | None = workdir
        self._owns_workdir = workdir is None
        self._backend: _Backend = (
            _MosquittoBackend(binary, config, max_packet_size)
            if self.kind == "mosquitto" and binary
            else _AmqttBackend()
        )

    @property
    def url(self) -> str:
        """``mqtt://host:port`` for clients (IPv6 hosts in brackets)."""
        return str(BrokerURL("mqtt", self.host, self.port))

    @property
    def pid(self) -> int | None:
        """Process id of a running Mosquitto; None for amqtt or when stopped."""
        backend = self._backend
        if isinstance(backend, _MosquittoBackend) and backend.is_running():
            assert backend.proc is not None
            return backend.proc.pid
        return None

    @property
    def log_path(self) -> Path | None:
        """The broker's log file (Mosquitto: everything; amqtt: warnings and errors)."""
        if self.workdir is None:
            return None
        return self.workdir / ("mosquitto.log" if self.kind == "mosquitto" else "amqtt.log")

    def describe(self) -> str:
        """One line for humans.

        E.g. ``Mosquitto 2.0.11 on 127.0.0.1:38211 (started by emo, pid 1234)``.
        """
        return self._backend.describe(self.host, self.port)

    def is_running(self) -> bool:
        """True while the broker process (or thread) is alive."""
        return self._backend.is_running()

    def start(self) -> None:
        """Start the broker and return once its port accepts TCP connections.

        Raises :class:`BrokerError` (with the tail of the broker's log) if it exits early or
        does not listen within ``START_TIMEOUT_S``.
        """
        if self.is_running():
            raise BrokerError(f"broker already running: {self.describe()}")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"emo-{self.kind}-"))
        for attempt in range(3):
            try:
                _check_port_free(self.host, self.port)
                self._backend.start(self.host, self.port, self.workdir)
                break
            except _PortInUse:
                # Someone took the port we picked between find_free_port() and the bind:
                # pick another, but never move a port the caller chose or a restart.
                if not self._auto_port or attempt == 2:
                    raise
                self.port = find_free_port(self.host)
        # Later starts (restart) must come back on the same port: clients reconnect there.
        self._auto_port = False
        _log.info("started %s (workdir %s)", self.describe(), self.workdir)

    def stop(self) -> None:
        """Stop the broker; stopping a stopped broker does nothing.

        Mosquitto gets SIGTERM (it then saves its persistence database), SIGKILL after
        ``STOP_TIMEOUT_S``, and is reaped. The workdir is kept for :meth:`restart`.
        """
        self._backend.stop()

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, so Mosquitto saves nothing since its last autosave.

        The embedded amqtt broker runs in a thread, which cannot be killed: this is stop().
        """
        self._backend.stop(signal.SIGKILL)

    def restart(self) -> None:
        """stop() then start() on the same port and workdir.

        Mosquitto's persistent sessions and queued messages survive; amqtt has no
        persistence and forgets all sessions.
        """
        self.stop()
        self.start()

    def close(self) -> None:
        """stop(), then delete the workdir if this handle created it."""
        self.stop()
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> BrokerHandle:
        try:
            self.start()
        except BaseException:
            self.close()  # __exit__ will not run: remove the workdir we may have created
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BrokerHandle {self.kind} {self.url} running={self.is_running()}>"


def run_foreground(
    port: int,
    host: str = "127.0.0.1",
    config: Path | None = None,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
) -> int:
    """Run Mosquitto in the foreground (logging to this terminal) until it exits.

    ``config`` is a template with the same placeholders as the shipped ``mosquitto.conf``
    (the default); a plain Mosquitto config without braces is used as is. It is rendered
    into a temporary run directory, which also holds the persistence database and is
    deleted on exit. SIGINT/SIGTERM/SIGHUP sent to this process are forwarded to the
    broker (SIGHUP makes Mosquitto reload its config). Returns the broker's exit code
    (128 + N if a signal N killed it). ``max_packet_size`` fills the template's packet cap.
    """
    binary = find_mosquitto()
    if binary is None:
        raise BrokerError(f"no mosquitto binary found: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="emo-mosquitto-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "data").mkdir()
        conf = run_dir / "mosquitto.conf"
        text = render_config(port, host, run_dir / "data", config, max_packet_size)
        conf.write_text(text, encoding="utf-8")
        proc: subprocess.Popen[bytes] | None = None
        early: list[int] = []  # signals that arrived before the broker existed

        def forward(signum: int, frame: FrameType | None) -> None:
            del frame
            if proc is None:
                early.append(signum)
            else:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

        # Handlers go in before the broker starts: a SIGTERM in between would otherwise
        # kill us and orphan the broker.
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signal() needs it
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, forward)
        try:
            # Own session: a terminal's Ctrl-C reaches only us, and we forward it once.
            proc = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                cwd=run_dir,
                start_new_session=True,
                preexec_fn=_preexec(),
            )
            for signum in early:
                proc.send_signal(signum)
            rc = proc.wait()  # PEP 475: the wait resumes after each forwarded signal
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if proc is not None and proc.poll() is None:  # an exception: stop the broker too
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return rc if rc >= 0 else 128 - rc
