"""``emo fleet provision --sites K``: a cloud broker and K site brokers, bridged over TLS.

On top of what :func:`emo_mqtt.provision.provision` writes for the cloud broker (``DIR``:
CA, broker certificate, one identity per node, ``passwd``, ``acl``, ``mosquitto.conf``),
each site ``k`` gets ``DIR/sites/site<k>/``, a directory to copy to the site's broker host:

* ``ca/ca.crt``, ``broker/broker.{key,crt}``: the site broker's certificate, signed by the
  fleet's CA, for the site's host name or address;
* ``bridge/client.{key,crt}``: the bridge's identity ``bridge-site<k>``; the cloud broker
  takes its CN as the username, like any node's;
* ``passwd``, ``acl``: the site's own nodes only (overlay ``ovl<k>`` and its devices, plus
  the read-only ``monitor``), least privilege as on the cloud;
* ``mosquitto.conf``: the same TLS listener as the cloud's (client certificates required,
  identity = certificate), plus a bridge section to the cloud with ``bridge_cafile`` /
  ``bridge_certfile`` / ``bridge_keyfile``: TLS between brokers, the cloud verified
  against the CA, the site proving itself with its bridge certificate.

The cloud's ``acl`` gains a ``user bridge-site<k>`` block per site: it may write only what
its nodes publish up and read only what comes down to them (:func:`emo_mqtt.sites.
bridge_topics`). The ``node.json`` of a site's nodes names the site broker's URL. The
configuration files use absolute paths: put the site directory at the same path on the site
host (or edit the paths).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from emo_mqtt.broker.url import BrokerURL, parse_broker_url
from emo_mqtt.errors import ConfigError
from emo_mqtt.provision import (
    DAYS,
    MONITOR,
    _broker_user,
    _conf_text,
    _hash_passwords,
    _key_and_csr,
    _sign,
    _tool,
    acl_text,
    devices_of,
    provision,
)
from emo_mqtt.sites import BridgeTLS, bridge_section, bridge_topics, site_name

__all__ = ["provision_sites"]

_COMMON = (
    "basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid,issuer\n"
)


def _san(host: str) -> str:
    import ipaddress

    try:
        return f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        return f"DNS:{host}"


def _acl_blocks(acl: str, users: set[str]) -> str:
    """The blocks of ``acl`` (``user X`` then its ``topic`` lines) whose user is in ``users``."""
    blocks = acl.split("\n\n")
    head = [b for b in blocks if not b.startswith("user ")]
    kept = [b for b in blocks if b.startswith("user ") and b.split()[1] in users]
    return "\n\n".join([*head[:1], *kept]) + "\n"


def _bridge_acl(name: str, devices: list[str], overlay: str, run: str | None) -> str:
    """The cloud's ACL block for a site's bridge: write what goes up, read what comes down."""
    lines = [f"user bridge-{name}"]
    for t in bridge_topics(devices, [overlay], run):
        lines.append(f"topic {'write' if t.direction == 'out' else 'read'} {t.filter}")
    return "\n".join(lines) + "\n"


def provision_sites(
    out: Path,
    devices: int,
    sites: int,
    *,
    host: str = "127.0.0.1",
    port: int = 8883,
    site_hosts: list[str] | None = None,
    site_port: int | None = None,
    run: str | None = None,
    bind: str | None = None,
    days: int = DAYS,
) -> dict[str, object]:
    """Provision a cloud broker at ``host:port`` and ``sites`` bridged site brokers.

    Site ``k`` (overlay ``ovl<k>`` and its devices) listens on ``site_hosts[k]`` (default:
    ``host`` for every site) and port ``site_port + k`` (default ``port + 1 + k``, so that
    all brokers fit on one machine for a trial). Returns :func:`provision`'s summary plus
    ``sites``: per site its directory, broker URL, config and usernames.
    """
    if sites < 1:
        raise ConfigError("--sites needs at least 1 site")
    hosts = site_hosts or [host] * sites
    if len(hosts) != sites:
        raise ConfigError(f"--site-hosts names {len(hosts)} hosts for {sites} sites")
    base_port = port + 1 if site_port is None else site_port
    urls = [
        parse_broker_url(str(BrokerURL("mqtts", h, base_port + k))) for k, h in enumerate(hosts)
    ]
    openssl = _tool("openssl")
    passwd_tool = _tool("mosquitto_passwd")
    summary = provision(out, devices, sites, host=host, port=port, run=run, bind=bind, days=days)
    out = out.resolve()
    user, uid, gid = _broker_user()
    acl = acl_text(devices, sites, run)
    written: list[dict[str, object]] = []
    cloud_acl = (out / "acl").read_text(encoding="utf-8")
    for k, site_host in enumerate(hosts):
        name, overlay = site_name(k), f"ovl{k}"
        site_devices = devices_of(k, devices, sites)
        where = out / "sites" / name
        for sub in ("ca", "broker", "bridge", "data"):
            (where / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "ca" / "ca.crt", where / "ca" / "ca.crt")
        sans = sorted({"IP:127.0.0.1", "DNS:localhost", _san(site_host)})
        _key_and_csr(openssl, where / "broker" / "broker.key", where / "broker" / "b.csr", name)
        _sign(
            openssl,
            out / "ca",
            where / "broker" / "b.csr",
            where / "broker" / "broker.crt",
            _COMMON + "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=serverAuth\n" + f"subjectAltName={','.join(sans)}\n",
            days,
        )
        _key_and_csr(
            openssl, where / "bridge" / "client.key", where / "bridge" / "c.csr", f"bridge-{name}"
        )
        _sign(
            openssl,
            out / "ca",
            where / "bridge" / "c.csr",
            where / "bridge" / "client.crt",
            _COMMON + "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=clientAuth\n",
            days,
        )
        usernames = [f"overlay-{overlay}", *(f"device-{d}" for d in site_devices), MONITOR]
        passwords: dict[str, str] = {}
        for username in usernames:
            node_json = out / "nodes" / username / "node.json"
            node = json.loads(node_json.read_text(encoding="utf-8"))
            passwords[username] = str(node["password"])
            if username != MONITOR:  # the monitor watches the cloud, where all telemetry is
                node["broker"] = str(urls[k])
                node_json.write_text(json.dumps(node, indent=2) + "\n", encoding="utf-8")
        _hash_passwords(passwd_tool, where, passwords)
        (where / "acl").write_text(_acl_blocks(acl, set(usernames)), encoding="utf-8")
        bridge = bridge_section(
            name,
            f"{host}:{port}",
            bridge_topics(site_devices, [overlay], run),
            tls=BridgeTLS(
                str(where / "ca" / "ca.crt"),
                str(where / "bridge" / "client.crt"),
                str(where / "bridge" / "client.key"),
            ),
        )
        conf = _conf_text(where, base_port + k, bind, user).replace(
            "# emo-mqtt broker for a fleet,", f"# emo-mqtt site broker {name} of a fleet,", 1
        )
        (where / "mosquitto.conf").write_text(conf + "\n" + bridge, encoding="utf-8")
        cloud_acl += "\n" + _bridge_acl(name, site_devices, overlay, run)
        _hand_over_site(where, uid, gid)
        written.append(
            {
                "dir": str(where),
                "broker": str(urls[k]),
                "conf": str(where / "mosquitto.conf"),
                "usernames": usernames,
                "bridge_username": f"bridge-{name}",
            }
        )
    (out / "acl").write_text(cloud_acl, encoding="utf-8")
    summary["sites"] = written
    return summary


def _hand_over_site(where: Path, uid: int | None, gid: int | None) -> None:
    """The site broker's user may read its keys and files and write ``data/``; others not."""
    for path in (where / "broker", where / "bridge", where / "data"):
        path.chmod(0o700)
    for path in (where / "passwd", where / "acl", where / "broker" / "broker.key"):
        path.chmod(0o600)
    (where / "bridge" / "client.key").chmod(0o600)
    where.chmod(0o711)
    (where / "ca").chmod(0o711)
    if uid is None or gid is None:
        return
    for path in where.rglob("*"):
        os.chown(path, uid, gid)
    os.chown(where, uid, gid)
