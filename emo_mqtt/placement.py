"""Where the nodes of a large fleet run, and which broker each one talks to (pure).

``emo run --workers N`` spreads the devices and overlays of a fleet over worker processes
(:mod:`emo_mqtt.workers`); the server stays in the launching process. Every node keeps its
own MQTT connection wherever it runs. This module decides, from plain data, which worker
holds which node, how many nodes may connect at once, and which broker URL a node uses:
all of it testable without a process, a socket or an event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: Below this many devices a fleet runs in one process when ``--workers`` is left out:
#: starting a worker (a fresh interpreter importing torch, reading the data) costs seconds,
#: more than what a small fleet's rounds gain from it (docs/performance.md).
AUTO_WORKERS_MIN_DEVICES = 200

#: Nodes of one process connecting and subscribing at the same time. A thousand clients
#: connecting at once keep the event loop busy with handshakes for many seconds, during
#: which no acknowledgement is read: the server's own publishes time out (issue 12).
START_CONCURRENCY = 32


#: Seconds a node of a fleet run over worker processes waits for a publish to be acknowledged
#: (plus the bus's allowance per MB). Ten, the LAN default, is short for a loop that serves
#: thousands of clients while it trains: a late acknowledgement is not a lost broker.
FLEET_PUBLISH_TIMEOUT_S = 30.0


def resolve_workers(requested: int | None, devices: int, cpus: int) -> int:
    """The number of worker processes for a fleet: ``requested`` if given (``0``: none,
    all in this process), else one per CPU for fleets of at least
    :data:`AUTO_WORKERS_MIN_DEVICES` devices and none below. Never more than the devices."""
    if requested is not None:
        if requested < 0:
            raise ValueError("workers must be >= 0")
        return min(requested, devices)
    if devices < AUTO_WORKERS_MIN_DEVICES:
        return 0
    return max(1, min(cpus, devices))


def assign(overlays: Sequence[str], devices: Sequence[str], workers: int) -> list[list[str]]:
    """Deal the nodes to ``workers`` lists: overlays first, then devices, each in turn.

    Dealing in turn (not in blocks) spreads the overlays, which train all the time, over
    different workers, and gives each worker about as many of every overlay's devices, so
    that a round's sampled devices land on every worker alike. Deterministic: the same
    fleet always gets the same placement.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    out: list[list[str]] = [[] for _ in range(workers)]
    for i, node in enumerate([*overlays, *devices]):
        out[i % workers].append(node)
    return out


def start_concurrency(nodes: int, limit: int = START_CONCURRENCY) -> int:
    """How many of a process's ``nodes`` connect at once (at least one)."""
    return max(1, min(nodes, limit))


@dataclass(frozen=True)
class BrokerMap:
    """Which broker each node connects to: ``default``, unless ``nodes`` names another.

    The one place a node's broker URL comes from, in the launching process and in the
    workers alike: a topology of site brokers (one per overlay's site) fills ``nodes``.
    Plain data, so that it travels to worker processes as it is.
    """

    default: str
    nodes: Mapping[str, str] = field(default_factory=dict)

    def broker_for(self, node_id: str) -> str:
        """The broker URL ``node_id`` connects to."""
        return self.nodes.get(node_id, self.default)
