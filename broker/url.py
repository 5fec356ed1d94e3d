"""Broker URLs: ``mqtt://[user[:password]@]host[:port]`` and ``mqtts://...``.

One small, strict parser so every node, the CLI and the tests agree on what a broker
address means, and a typo fails at start-up with a clear :class:`ConfigError` instead of
as a connection timeout later.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import quote, unquote, urlsplit

from emo_mqtt.errors import ConfigError

__all__ = ["DEFAULT_PORTS", "BrokerURL", "parse_broker_url"]

Scheme = Literal["mqtt", "mqtts"]

#: IANA ports for MQTT over plain TCP and over TLS.
DEFAULT_PORTS: dict[str, int] = {"mqtt": 1883, "mqtts": 8883}
#: Other spellings of the two schemes, as Grafana, paho and mosquitto_sub users write them.
SCHEME_ALIASES: dict[str, Scheme] = {"tcp": "mqtt", "ssl": "mqtts", "tls": "mqtts"}

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


@dataclass(frozen=True)
class BrokerURL:
    """A parsed broker address.

    ``host`` is stored without brackets, also for IPv6 (``"::1"``). ``password`` is kept
    out of ``repr`` and ``str`` so logging a URL never leaks it.
    """

    scheme: Scheme
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: TLS files for ``mqtts`` (PEM paths): the CA that signed the broker's certificate
    #: (None: the system's CAs) and this client's certificate and key (None: no client
    #: certificate). Not part of the URL's text; set by ``emo node --node-config``.
    ca_file: str | None = field(default=None, compare=False)
    cert_file: str | None = field(default=None, compare=False)
    key_file: str | None = field(default=None, compare=False, repr=False)

    @property
    def tls(self) -> bool:
        """True for ``mqtts``: the connection must be wrapped in TLS."""
        return self.scheme == "mqtts"

    @property
    def netloc_host(self) -> str:
        """The host as it appears in a URL: IPv6 addresses in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        """Render as ``scheme://[user@]host:port``; the password is never rendered."""
        user = f"{quote(self.username, safe='')}@" if self.username is not None else ""
        return f"{self.scheme}://{user}{self.netloc_host}:{self.port}"


def _bad(url: str, why: str) -> ConfigError:
    return ConfigError(
        f"invalid broker URL {url!r}: {why} "
        "(expected mqtt://[user[:password]@]host[:port] or mqtts://...)"
    )


def _split_host_port(url: str, hostport: str) -> tuple[str, str | None]:
    """Split ``host[:port]`` / ``[v6]:port``; validate the host; return the port unparsed."""
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket:
            raise _bad(url, "unclosed '[' around an IPv6 address")
        if not host:
            raise _bad(url, "empty host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(url, f"{host!r} is not a valid IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise _bad(url, f"unexpected {rest!r} after the IPv6 address")
        return host, (rest[1:] if rest else None)
    host, colon, port_text = hostport.partition(":")
    if ":" in port_text:
        raise _bad(url, "IPv6 addresses must be written in brackets, e.g. mqtt://[::1]:1883")
    if not host:
        raise _bad(url, "empty host")
    if not _HOSTNAME_RE.fullmatch(host):
        raise _bad(url, f"{host!r} is not a valid host name or address")
    if all(label.isdigit() for label in host.rstrip(".").split(".")):
        try:  # all-numeric names are IPv4 addresses and must be valid ones
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _bad(url, f"{host!r} is not a valid IPv4 address") from None
    return host, (port_text if colon else None)


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL, raising :class:`ConfigError` if it is not one we accept.

    Accepted: ``mqtt://host:port``, ``mqtt://host`` (port 1883), ``mqtts://host[:port]``
    (port 8883), ``mqtt://user:pass@host:port`` (percent-encoded user and password are
    decoded) and IPv6 literals in brackets, ``mqtt://[::1]:1884``. ``tcp://`` means
    ``mqtt://`` and ``ssl://`` or ``tls://`` mean ``mqtts://`` (paho's and Grafana's
    spellings); a bare ``host:port`` or ``host`` is plain ``mqtt``. Paths, queries and
    fragments are rejected rather than ignored: they usually mean a mistyped URL.
    """
    if not isinstance(url, str):
        raise ConfigError(f"broker URL must be a string, not {type(url).__name__}")
    text = url.strip()
    if not text:
        raise ConfigError("broker URL is empty")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        # urlsplit silently deletes tabs and newlines; a URL containing them is a paste error.
        raise _bad(url, "contains whitespace or control characters")
    if "://" not in text:
        if "/" in text:
            raise _bad(url, "missing scheme")
        if text.isdigit():
            raise _bad(url, f"a port alone; did you mean 127.0.0.1:{text}?")
        text = f"mqtt://{text}"  # host[:port], as mosquitto_sub -h/-p users think of it
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed bracket
        raise _bad(url, str(exc)) from None

    scheme = parts.scheme.lower()
    scheme = SCHEME_ALIASES.get(scheme, scheme)
    if scheme not in DEFAULT_PORTS:
        raise _bad(url, f"unsupported scheme {parts.scheme!r}, use mqtt (tcp) or mqtts (ssl)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _bad(url, "unexpected path, query or fragment")
    # Host and port are split by hand: urlsplit lower-cases the host, accepts port 0 and
    # raises late, with terse messages, on a bad port.
    host, port_text = _split_host_port(url, parts.netloc.rpartition("@")[2])
    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    elif not _PORT_RE.fullmatch(port_text):
        raise _bad(url, f"port {port_text!r} is not a number" if port_text else "empty port")
    else:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise _bad(url, f"port {port} out of range 1-65535")

    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if username == "":
        raise _bad(url, "empty user name before '@'")
    return BrokerURL(cast(Scheme, scheme), host, port, username, password)
