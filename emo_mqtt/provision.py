"""``emo fleet provision``: the files a fleet needs to run on a Mosquitto with TLS and ACLs.

One call writes, under ``DIR``:

* ``ca/ca.key``, ``ca/ca.crt``: a private certificate authority (EC P-256);
* ``broker/broker.key``, ``broker/broker.crt``: the broker's certificate, signed by the CA,
  valid for ``127.0.0.1``, ``localhost`` and ``--host``;
* ``nodes/<username>/``: one directory per identity to copy to its machine: ``node.json``
  (role, id, run, broker URL, username, password, TLS file names), ``ca.crt``,
  ``client.crt`` and ``client.key``. Usernames are ``<role>-<id>`` (``server-server``,
  ``overlay-ovl0``, ``device-dev00``) plus a read-only ``monitor`` for dashboards;
* ``passwd``: the Mosquitto password file, hashed with ``mosquitto_passwd -U`` (provisioning
  fails rather than leave plain-text passwords on disk), for listeners an operator adds
  without client certificates;
* ``acl``: least-privilege ACLs by the topic tree (see :func:`acl_text`);
* ``mosquitto.conf``: one TLS listener that requires a client certificate signed by the CA
  and takes the certificate's CN as the username (``use_identity_as_username``) and the
  username as the client id (``use_username_as_clientid``): an identity is its certificate,
  it cannot log in as another one nor take over another one's session. It refuses
  anonymous clients, applies the ACLs and never runs as root (``user mosquitto`` when
  provisioned as root, which then owns ``broker/``, ``passwd``, ``acl`` and ``data/``).
  ``mosquitto -c DIR/mosquitto.conf`` starts it as is. Persistence lives in ``DIR/data``.

Keys are written with mode 0600. It runs the ``openssl`` and ``mosquitto_passwd`` commands.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from emo_mqtt.broker.url import BrokerURL, parse_broker_url
from emo_mqtt.errors import ConfigError
from emo_mqtt.topics import ROOT, TELEMETRY, telemetry_filter, validate_id

__all__ = ["Identity", "acl_text", "load_node_config", "provision"]

DAYS = 825
MONITOR = "monitor"


@dataclass(frozen=True)
class Identity:
    """One MQTT identity of the fleet."""

    role: str  # server, overlay, device or monitor
    node_id: str

    @property
    def username(self) -> str:
        return MONITOR if self.role == MONITOR else f"{self.role}-{self.node_id}"


def _tool(name: str, *extra: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", *extra) if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ConfigError(
            f"`{name}` not found: install it (Debian: openssl, mosquitto-clients or mosquitto)"
        )
    return found


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"{' '.join(args[:3])} failed: {proc.stderr.strip()[-500:]}")


def _device_ids(devices: int) -> list[str]:
    return [f"dev{i:02d}" for i in range(devices)]


def _overlay_ids(overlays: int) -> list[str]:
    return [f"ovl{i}" for i in range(overlays)]


def devices_of(overlay: int, devices: int, overlays: int) -> list[str]:
    """Devices dealt to overlays in turn (``RunConfig.devices_of``): dev i -> ovl (i % K)."""
    return [d for i, d in enumerate(_device_ids(devices)) if i % overlays == overlay]


def acl_text(devices: int, overlays: int, run: str | None = None, server: str = "server") -> str:
    """The Mosquitto ACL file: what each username may read and write.

    Topics are ``emo/<run>/...``; with ``run`` None the run level is ``+`` (any run).
    Devices write only below their own id and read the round, the end of the run, their
    own control topic and their own SplitFed gradients; overlays read only their own
    devices' activations; only the server writes ``server/*`` and ``control/*``; the
    monitor only reads the telemetry branch (statuses, metrics, run states).
    """
    r = f"{ROOT}/{run if run is not None else '+'}"
    lines = [
        "# emo-mqtt ACLs written by `emo fleet provision`: least privilege by topic.",
        "# No `topic` line before the first `user` line: anonymous clients get nothing.",
        "",
    ]

    def block(user: str, reads: list[str], writes: list[str]) -> None:
        lines.append(f"user {user}")
        lines.extend(f"topic read {t}" for t in reads)
        lines.extend(f"topic write {t}" for t in writes)
        lines.append("")

    block(
        f"server-{server}",
        [
            f"{r}/{TELEMETRY}/status/+/+",
            f"{r}/device/+/update",
            f"{r}/device/+/sfl/activations",
            f"{r}/overlay/+/model",
        ],
        [
            f"{r}/server/#",
            f"{r}/control/#",
            f"{r}/{TELEMETRY}/status/server/{server}",
            f"{r}/{TELEMETRY}/metrics/server/{server}",
            f"{r}/{TELEMETRY}/run",
        ],
    )
    for k, ovl in enumerate(_overlay_ids(overlays)):
        block(
            f"overlay-{ovl}",
            [
                *(f"{r}/device/{d}/activations" for d in devices_of(k, devices, overlays)),
                f"{r}/server/round",
                f"{r}/server/done",
            ],
            [
                f"{r}/overlay/{ovl}/model",
                f"{r}/{TELEMETRY}/status/overlay/{ovl}",
                f"{r}/{TELEMETRY}/metrics/overlay/{ovl}",
            ],
        )
    for dev in _device_ids(devices):
        block(
            f"device-{dev}",
            [
                f"{r}/server/round",
                f"{r}/server/done",
                f"{r}/control/{dev}",
                f"{r}/server/sfl/{dev}/gradients",
            ],
            [
                f"{r}/device/{dev}/update",
                f"{r}/device/{dev}/activations",
                f"{r}/device/{dev}/sfl/activations",
                f"{r}/{TELEMETRY}/status/device/{dev}",
                f"{r}/{TELEMETRY}/metrics/device/{dev}",
            ],
        )
    # Dashboards subscribe to emo/+/telemetry/# (all JSON of any run, no weights): read-only.
    block(MONITOR, [telemetry_filter()], [])
    return "\n".join(lines)


def _conf_text(out: Path, port: int, bind: str | None, user: str) -> str:
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    return f"""# emo-mqtt broker for a fleet, written by `emo fleet provision`.
# Start it with: mosquitto -c {out}/mosquitto.conf
per_listener_settings false
allow_anonymous false
password_file {out}/passwd
acl_file {out}/acl

{listener}
# TLS: the broker proves itself with broker.crt; every client must present a certificate
# signed by the fleet's CA. The certificate *is* the login: its CN becomes the username
# (whatever username or password the client sends), so dev01's certificate can only ever
# act as device-dev01, under device-dev01's ACLs.
cafile {out}/ca/ca.crt
certfile {out}/broker/broker.crt
keyfile {out}/broker/broker.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
# The client id is the username: a device cannot take over another node's session (and
# destroy its queued messages) by connecting with that node's client id. One connection
# per identity: a second one with the same certificate replaces the first.
use_username_as_clientid true

# Mosquitto started as root drops to this user (never root), which owns what it must read
# and write: broker/, passwd, acl and data/.
user {user}

# The same limits as the development config (broker/mosquitto.conf).
max_packet_size 2162688
max_inflight_messages 64
max_inflight_bytes 33554432
max_queued_messages 10000
max_queued_bytes 268435456
queue_qos0_messages false
persistence true
persistence_location {out}/data
persistence_file mosquitto.db
autosave_interval 60
persistent_client_expiration 1d
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
log_timestamp true
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true
set_tcp_nodelay true
"""


def _broker_user() -> tuple[str, int | None, int | None]:
    """The user the broker runs as, and its uid/gid when we must hand files over to it.

    Never root: Mosquitto started as root drops to ``user``. Provisioning as root, that is
    the ``mosquitto`` user (Debian's package creates it), which is given the broker's own
    files; as anyone else, the broker runs as that user anyway (``user`` is then ignored).
    """
    if os.geteuid() != 0:
        try:
            return pwd.getpwuid(os.geteuid()).pw_name, None, None
        except KeyError:
            return "mosquitto", None, None
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:  # broker on another machine: its `mosquitto` user must own the files
        return "mosquitto", None, None
    return "mosquitto", entry.pw_uid, entry.pw_gid


def _hand_over(out: Path, uid: int | None, gid: int | None) -> None:
    """Let the broker's user read (and for data/, write) what it needs, and nothing else.

    The directories on the way are traversable but not listable (0711); the CA key and the
    node directories stay the provisioning user's alone.
    """
    for path in (out, out / "ca"):
        path.chmod(0o711)
    for path in (out / "nodes", out / "broker", out / "data"):
        path.chmod(0o700)
    (out / "ca" / "ca.crt").chmod(0o644)
    (out / "mosquitto.conf").chmod(0o644)
    if uid is None or gid is None:
        return
    for path in (
        out / "broker",
        out / "broker" / "broker.key",
        out / "broker" / "broker.crt",
        out / "passwd",
        out / "acl",
        out / "data",
    ):
        os.chown(path, uid, gid)


def _hash_passwords(passwd_tool: str, out: Path, passwords: dict[str, str]) -> None:
    """Write ``out/passwd`` hashed, or fail: plain-text passwords never stay on disk.

    The plain text goes to a private temporary file next to it, ``mosquitto_passwd -U``
    hashes it in place, every line is checked to be hashed, and only then is it renamed to
    ``passwd``; on any failure the temporary file is removed and :class:`ConfigError`
    raised.
    """
    fd, name = tempfile.mkstemp(prefix=".passwd-", dir=out)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
            f.write("".join(f"{u}:{p}\n" for u, p in passwords.items()))
        try:
            _run([passwd_tool, "-U", str(tmp)])
        except ConfigError as exc:
            raise ConfigError(f"could not hash the broker's passwords: {exc}") from exc
        lines = tmp.read_text(encoding="utf-8").splitlines()
        hashed = {u: h for u, _, h in (line.partition(":") for line in lines)}
        if set(hashed) != set(passwords) or any(
            not h.startswith("$") or h == passwords[u] for u, h in hashed.items()
        ):
            raise ConfigError(
                f"`{passwd_tool} -U` did not hash every password; refusing to "
                "write a plain-text password file"
            )
        tmp.replace(out / "passwd")
    finally:
        tmp.unlink(missing_ok=True)


def _key_and_csr(openssl: str, key: Path, csr: Path, cn: str) -> None:
    _run(
        [
            openssl,
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={cn}",
        ]
    )
    key.chmod(0o600)


def _sign(openssl: str, ca: Path, csr: Path, crt: Path, extensions: str, days: int) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".ext", delete=False) as f:
        f.write(extensions)
    try:
        _run(
            [
                openssl,
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(ca / "ca.crt"),
                "-CAkey",
                str(ca / "ca.key"),
                "-set_serial",
                f"0x{secrets.token_hex(16)}",
                "-days",
                str(days),
                "-sha256",
                "-extfile",
                f.name,
                "-out",
                str(crt),
            ]
        )
    finally:
        os.unlink(f.name)
    csr.unlink()


def provision(
    out: Path,
    devices: int,
    overlays: int,
    *,
    host: str = "127.0.0.1",
    port: int = 8883,
    run: str | None = None,
    bind: str | None = None,
    days: int = DAYS,
) -> dict[str, object]:
    """Write the CA, certificates, credentials, ACLs and broker config for a fleet under ``out``.

    Returns a summary (paths, usernames). ``out`` must not hold a previous provisioning
    (``ConfigError``): re-provisioning over it would replace the CA under running nodes.
    """
    if devices < 1 or overlays < 0:
        raise ConfigError("need at least 1 device and 0 or more overlays")
    if run is not None:
        validate_id(run, "run")
    url = parse_broker_url(str(BrokerURL("mqtts", host, port)))  # a bad host fails here
    out = out.resolve()
    if (out / "ca" / "ca.key").exists():
        raise ConfigError(f"{out} already holds a CA: provision into a new directory")
    openssl = _tool("openssl")
    passwd_tool = _tool("mosquitto_passwd")
    for sub in ("ca", "broker", "nodes", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    ca = out / "ca"
    _run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(ca / "ca.key"),
            "-out",
            str(ca / "ca.crt"),
            "-days",
            str(days),
            "-sha256",
            "-subj",
            "/CN=emo-mqtt fleet CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )
    (ca / "ca.key").chmod(0o600)

    common = (
        "basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    sans = ["IP:127.0.0.1", "DNS:localhost"]
    try:
        extra = f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        extra = f"DNS:{host}"
    if extra not in sans:
        sans.append(extra)
    _key_and_csr(openssl, out / "broker" / "broker.key", out / "broker" / "broker.csr", host)
    _sign(
        openssl,
        ca,
        out / "broker" / "broker.csr",
        out / "broker" / "broker.crt",
        common + "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth\n" + f"subjectAltName={','.join(sans)}\n",
        days,
    )

    identities = [
        Identity("server", "server"),
        *(Identity("overlay", o) for o in _overlay_ids(overlays)),
        *(Identity("device", d) for d in _device_ids(devices)),
        Identity(MONITOR, MONITOR),
    ]
    passwords: dict[str, str] = {}
    for ident in identities:
        where = out / "nodes" / ident.username
        where.mkdir(exist_ok=True)
        _key_and_csr(openssl, where / "client.key", where / "client.csr", ident.username)
        _sign(
            openssl,
            ca,
            where / "client.csr",
            where / "client.crt",
            common + "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=clientAuth\n",
            days,
        )
        shutil.copyfile(ca / "ca.crt", where / "ca.crt")
        password = secrets.token_urlsafe(24)
        passwords[ident.username] = password
        config = {
            "role": ident.role,
            "id": ident.node_id,
            "run": run,
            "broker": str(url),
            "username": ident.username,
            "password": password,
            "ca": "ca.crt",
            "cert": "client.crt",
            "key": "client.key",
        }
        node_json = where / "node.json"
        node_json.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        node_json.chmod(0o600)

    _hash_passwords(passwd_tool, out, passwords)
    (out / "acl").write_text(acl_text(devices, overlays, run), encoding="utf-8")
    (out / "acl").chmod(0o600)
    user, uid, gid = _broker_user()
    (out / "mosquitto.conf").write_text(_conf_text(out, port, bind, user), encoding="utf-8")
    _hand_over(out, uid, gid)
    summary: dict[str, object] = {
        "dir": str(out),
        "broker": str(url),
        "conf": str(out / "mosquitto.conf"),
        "usernames": list(passwords),
        "broker_user": user,
    }
    blocked = _unreachable(out, uid, gid)
    if blocked is not None:
        summary["warning"] = (
            f"the broker's user {user} cannot enter {blocked}: run the broker "
            f"from a copy of {out} it can reach, or open {blocked} (o+x)"
        )
    return summary


def _unreachable(out: Path, uid: int | None, gid: int | None) -> Path | None:
    """The first directory above ``out`` that user ``uid`` (group ``gid``) cannot enter."""
    if uid is None or gid is None:
        return None
    for parent in out.parents:
        st = parent.stat()
        if not (
            st.st_mode & 0o001
            or (st.st_uid == uid and st.st_mode & 0o100)
            or (st.st_gid == gid and st.st_mode & 0o010)
        ):
            return parent
    return None


@dataclass(frozen=True)
class NodeConfig:
    """A node's ``node.json``, its TLS paths resolved against the file's directory."""

    role: str
    node_id: str
    run: str | None
    broker: BrokerURL


def load_node_config(path: str | Path) -> NodeConfig:
    """Read a ``node.json`` written by :func:`provision` (``ConfigError`` if unusable)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read node config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"node config {path} is not a JSON object")
    try:
        base = parse_broker_url(str(data["broker"]))
        role, node_id = str(data["role"]), str(data["id"])
    except KeyError as exc:
        raise ConfigError(f"node config {path} lacks {exc}") from None

    def file(key: str) -> str | None:
        value = data.get(key)
        return None if value is None else str((path.parent / str(value)).resolve())

    url = BrokerURL(
        base.scheme,
        base.host,
        base.port,
        data.get("username", base.username),
        data.get("password", base.password),
        ca_file=file("ca"),
        cert_file=file("cert"),
        key_file=file("key"),
    )
    run = data.get("run")
    return NodeConfig(role, node_id, None if run is None else str(run), url)
