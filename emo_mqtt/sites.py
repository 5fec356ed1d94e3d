"""Edge sites: one broker per site, bridged to a cloud broker (pure configuration).

This is how Mosquitto fleets grow: each site runs its own broker, and a bridge (Mosquitto's
``connection``/``topic`` settings) carries chosen topics to and from a cloud broker. EMO's
tiers map onto it:

* **site k** holds overlay ``ovl<k>`` and the devices it serves
  (:meth:`~emo_mqtt.config.RunConfig.devices_of`); their broker is the site's;
* **the cloud** holds the server (and dashboards); its broker is the cloud's.

What crosses a bridge is decided per topic kind, from :mod:`emo_mqtt.topics`, so the bridge
follows the topic grammar: **up** (site -> cloud) the FL updates, SplitFed activations,
overlay models and the nodes' telemetry (status, metrics); **down** (cloud -> site) round
announcements, the end of the run, control decisions and SplitFed gradients. EMO's
activations (:attr:`~emo_mqtt.topics.Kind.DEVICE_ACTIVATIONS`) are *never* bridged: devices
and their overlay meet on the site broker. SplitFed's activations must reach the server in
the cloud: they cross the bridge, which is SplitFed's honest cost in this topology.

Every bridge topic names one node (``emo/+/device/dev03/update``), so a site carries only
its own nodes' traffic (SplitFed gradients for another site's devices never come down), and
the cloud's ACL for a site's bridge is least privilege.

This module is pure: no I/O, no asyncio, no MQTT.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from emo_mqtt.config import RunConfig
from emo_mqtt.errors import ConfigError
from emo_mqtt.topics import SPECS, Kind, subscription, validate_id

__all__ = [
    "ACTIVATION_KINDS",
    "DOWN_KINDS",
    "SITE_LOCAL_KINDS",
    "UP_KINDS",
    "BridgeTLS",
    "BridgeTopic",
    "Topology",
    "bridge_figures",
    "bridge_section",
    "bridge_topics",
    "counts_since",
    "site_name",
    "site_nodes",
    "site_of",
]

#: Topic kinds a site sends up to the cloud.
UP_KINDS: tuple[Kind, ...] = (
    Kind.DEVICE_UPDATE,
    Kind.DEVICE_SFL_ACTIVATIONS,
    Kind.OVERLAY_MODEL,
    Kind.STATUS,
    Kind.METRICS,
)
#: Topic kinds the cloud sends down to a site.
DOWN_KINDS: tuple[Kind, ...] = (
    Kind.SERVER_ROUND,
    Kind.SERVER_DONE,
    Kind.CONTROL,
    Kind.SERVER_SFL_GRADIENTS,
)
#: Topic kinds that stay on the site broker (never bridged).
SITE_LOCAL_KINDS: frozenset[Kind] = frozenset(Kind) - set(UP_KINDS) - set(DOWN_KINDS)
#: Activation traffic: ``activation_bytes`` of a bridge counts these kinds.
ACTIVATION_KINDS: frozenset[Kind] = frozenset(
    {Kind.DEVICE_ACTIVATIONS, Kind.DEVICE_SFL_ACTIVATIONS}
)

Direction = Literal["in", "out"]


def site_name(k: int) -> str:
    """The name of site ``k`` (``site0``): bridge connection names, directories, identities."""
    return f"site{k}"


def _check_sites(config: RunConfig) -> int:
    # The config refuses fleet.overlays < 1 today; this keeps sites safe if that changes.
    if config.fleet.overlays < 1:
        raise ConfigError(
            "--topology sites needs at least one overlay: site k holds overlay k and the "
            "devices it serves (fleet.overlays = number of sites)"
        )
    return config.fleet.overlays


def site_of(config: RunConfig, node_id: str) -> int | None:
    """The site of ``node_id`` (overlay k and its devices: k), or None for the cloud."""
    if node_id == "server":
        return None
    _check_sites(config)
    overlays = config.overlay_ids()
    if node_id in overlays:
        return overlays.index(node_id)
    if node_id in config.device_ids():
        return overlays.index(config.overlay_of(node_id))
    raise ConfigError(f"unknown node {node_id!r}: not the server, an overlay or a device")


def site_nodes(config: RunConfig, k: int) -> tuple[list[str], list[str]]:
    """``(devices, overlays)`` of site ``k``."""
    overlay = config.overlay_ids()[k]
    return config.devices_of(overlay), [overlay]


@dataclass(frozen=True, slots=True)
class Topology:
    """Which broker each node of a fleet talks to: its site's, or the cloud's."""

    cloud: str
    sites: tuple[str, ...]
    #: node id -> site index, for every node that lives on a site.
    site_by_node: Mapping[str, int]

    @classmethod
    def for_config(cls, config: RunConfig, cloud: str, sites: Iterable[str]) -> Topology:
        urls = tuple(sites)
        if len(urls) != _check_sites(config):
            raise ConfigError(
                f"{config.fleet.overlays} sites needed, {len(urls)} broker URLs given"
            )
        nodes = {n: site_of(config, n) for n in config.overlay_ids() + config.device_ids()}
        return cls(cloud, urls, {n: k for n, k in nodes.items() if k is not None})

    def broker_for(self, node_id: str) -> str:
        """The broker URL of ``node_id``: its site's broker, or the cloud's (the server)."""
        k = self.site_by_node.get(node_id)
        return self.cloud if k is None else self.sites[k]


@dataclass(frozen=True, slots=True)
class BridgeTopic:
    """One ``topic`` line of a bridge: a filter, its direction and QoS, and its kind."""

    filter: str
    direction: Direction
    qos: int
    kind: Kind

    def line(self) -> str:
        """The Mosquitto ``topic`` line (``out``: site to cloud; ``in``: cloud to site)."""
        return f"topic {self.filter} {self.direction} {self.qos}"


def _filter(kind: Kind, run: str | None, node: str | None, role: str | None) -> str:
    """``kind``'s filter for one node, any run when ``run`` is None (``emo/+/...``)."""
    rendered = subscription(kind, run or "run", node=node, role=role)
    if run is not None:
        return rendered
    parts = rendered.split("/")
    parts[1] = "+"  # the run level: one bridge serves every run of the fleet
    return "/".join(parts)


def bridge_topics(
    devices: list[str], overlays: list[str], run: str | None = None
) -> list[BridgeTopic]:
    """The topics a site's bridge carries for its ``devices`` and ``overlays``."""
    if run is not None:
        validate_id(run, "run")
    qos = {spec.kind: spec.qos for spec in SPECS}
    out: list[BridgeTopic] = []

    def add(kind: Kind, direction: Direction, node: str | None, role: str | None) -> None:
        # QoS 1 at least on the bridge: telemetry published at QoS 0 still arrives once
        # the bridge is up; QoS is downgraded to the subscriber's anyway.
        level = max(1, qos[kind])
        out.append(BridgeTopic(_filter(kind, run, node, role), direction, level, kind))

    for dev in devices:
        add(Kind.DEVICE_UPDATE, "out", dev, None)
        add(Kind.DEVICE_SFL_ACTIVATIONS, "out", dev, None)
        add(Kind.STATUS, "out", dev, "device")
        add(Kind.METRICS, "out", dev, "device")
        add(Kind.CONTROL, "in", dev, None)
        add(Kind.SERVER_SFL_GRADIENTS, "in", dev, None)
    for ovl in overlays:
        add(Kind.OVERLAY_MODEL, "out", ovl, None)
        add(Kind.STATUS, "out", ovl, "overlay")
        add(Kind.METRICS, "out", ovl, "overlay")
    add(Kind.SERVER_ROUND, "in", None, None)
    add(Kind.SERVER_DONE, "in", None, None)
    kinds = {t.kind for t in out}
    assert not kinds & SITE_LOCAL_KINDS, "a site-local kind would cross the bridge"
    return out


@dataclass(frozen=True, slots=True)
class BridgeTLS:
    """TLS of a bridge: the CA that signed the cloud broker, and the site's own identity."""

    cafile: str
    certfile: str
    keyfile: str


def bridge_section(
    name: str,
    address: str,
    topics: list[BridgeTopic],
    *,
    tls: BridgeTLS | None = None,
) -> str:
    """The Mosquitto config lines of one bridge from a site broker to the cloud broker.

    ``address`` is ``host:port`` of the cloud broker (or of a relay in front of it).
    """
    validate_id(name, "bridge name")
    lines = [
        f"# -- Bridge {name}: this site's broker -> the cloud broker ------------------------",
        "# Written by emo-mqtt (emo_mqtt/sites.py): only the topics below cross; everything",
        "# else, EMO's activations above all, stays on this site.",
        f"connection {name}",
        f"address {address}",
        f"remote_clientid bridge-{name}",
        # The cloud keeps the bridge's session (and queues what is due to the site) across
        # a WAN outage; the bridge reconnects within seconds.
        "cleansession false",
        "restart_timeout 1 10",
        "keepalive_interval 30",
        # try_private: the cloud Mosquitto knows this client is a bridge, so it keeps the
        # retain flag of what it forwards (retained rounds, control decisions) and never
        # loops a message back.
        "try_private true",
        "notifications false",
        "start_type automatic",
    ]
    if tls is not None:
        lines += [
            f"bridge_cafile {tls.cafile}",
            f"bridge_certfile {tls.certfile}",
            f"bridge_keyfile {tls.keyfile}",
            "bridge_tls_version tlsv1.2",
            "bridge_insecure false",
        ]
    lines += [t.line() for t in topics]
    return "\n".join(lines) + "\n"


def bridge_figures(up: Mapping[str, object], down: Mapping[str, object]) -> dict[str, object]:
    """``summary.json``'s ``bridge`` entry from the wire meters of the bridge connections.

    ``up``/``down``: :meth:`~emo_mqtt.mqttwire.WireMeter.snapshot`-shaped counts (``bytes``,
    ``by_kind``) of what went site -> cloud and cloud -> site, summed over the sites.
    ``bytes`` counts every byte on the bridge connections (MQTT framing, acknowledgements
    and pings included); ``activation_bytes`` the bytes of PUBLISH packets on activation
    topics (both EMO's and SplitFed's), in either direction.
    """
    by_kind: dict[str, int] = {}
    for side in (up, down):
        for kind, n in _kinds(side).items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    activation = sum(by_kind.get(k.value, 0) for k in ACTIVATION_KINDS)
    return {
        "bytes": _int(up.get("bytes")) + _int(down.get("bytes")),
        "bytes_up": _int(up.get("bytes")),
        "bytes_down": _int(down.get("bytes")),
        "activation_bytes": activation,
        "bytes_by_kind": dict(sorted(by_kind.items())),
    }


def _int(value: object) -> int:
    return int(value) if isinstance(value, int) else 0


def _kinds(side: Mapping[str, object]) -> dict[str, int]:
    raw = side.get("by_kind")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): _int(v) for k, v in raw.items()}


def counts_since(
    now: Mapping[str, object], before: Mapping[str, object], *, _top: bool = True
) -> dict[str, object]:
    """``now`` less ``before``, key by key, for nested counts such as :func:`bridge_figures`'s:
    what crossed between two readings of the same meters. Below the top level, counts that
    did not change are left out (a kind that did not cross)."""
    out: dict[str, object] = {}
    for key, value in now.items():
        old = before.get(key)
        if isinstance(value, Mapping):
            out[key] = counts_since(value, old if isinstance(old, Mapping) else {}, _top=False)
        elif isinstance(value, int):
            diff = value - (old if isinstance(old, int) else 0)
            if diff or _top:
                out[key] = diff
        else:
            out[key] = value
    return out
