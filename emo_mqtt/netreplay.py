"""Replaying a scenario's network against the real broker: one shaping proxy per node.

:class:`NetworkReplay` starts a :class:`~emo_mqtt.shaping.ShapingProxy` per node, set to the
node's base conditions, and hands out each node's broker URL (the proxy's). Once the run
starts, :meth:`NetworkReplay.run_timeline` applies the scenario's timeline
(:meth:`emo_mqtt.netscenario.NetworkConfig.timeline`) at its times: links change, go down
and come back; ``crash`` and ``restart`` are delegated to the fleet through callbacks, since
only the fleet can stop and start nodes. Every applied event is recorded with the time it
actually took effect, so a run can be checked against its scenario afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from emo_mqtt.broker.url import parse_broker_url
from emo_mqtt.errors import ConfigError
from emo_mqtt.netscenario import LinkConditions, NetworkConfig, NodeEvent
from emo_mqtt.shaping import ShapingProxy

log = logging.getLogger("emo_mqtt.netreplay")

#: Fleet callbacks for ``crash`` and ``restart`` events: they receive the node id.
NodeAction = Callable[[str], Awaitable[None]]


class NetworkReplay:
    """The shaped links of one algorithm's fleet, and the timeline that drives them.

    ``nodes_by_class`` maps a link class (``device``, ``overlay``, ``server``) to node ids.
    Use ``async with``: the proxies start on entry and close on exit.
    """

    def __init__(
        self,
        network: NetworkConfig,
        broker_url: str,
        nodes_by_class: dict[str, list[str]],
        *,
        seed: int,
        horizon_s: float,
        on_crash: NodeAction | None = None,
        on_restart: NodeAction | None = None,
    ) -> None:
        url = parse_broker_url(broker_url)
        if url.scheme not in ("mqtt", "mqtts"):  # pragma: no cover - the parser allows only these
            raise ConfigError(f"network shaping needs a TCP broker, not {broker_url}")
        self.broker = url
        self.network = network
        self.seed = network.seed if network.seed is not None else seed
        self.link_class = {n: c for c, ids in nodes_by_class.items() for n in ids}
        self.timeline: list[NodeEvent] = network.timeline(
            nodes_by_class, seed=self.seed, horizon_s=horizon_s
        )
        self.horizon_s = horizon_s
        self._outages = self._longest_outages()
        self.on_crash = on_crash
        self.on_restart = on_restart
        self.proxies: dict[str, ShapingProxy] = {}
        self.conditions: dict[str, LinkConditions] = {}
        #: Events as applied: the scenario's time, the time they took effect, what they did.
        self.applied: list[dict[str, Any]] = []
        self._crashed: set[str] = set()
        self._down: set[str] = set()

    async def __aenter__(self) -> NetworkReplay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        for node, link_class in self.link_class.items():
            base = self.network.base_conditions(node, link_class)
            proxy = ShapingProxy(
                self.broker.host,
                self.broker.port,
                uplink=base.uplink(self.network.rto_s),
                downlink=base.downlink(self.network.rto_s),
                seed=hash_seed(self.seed, node),
            )
            await proxy.start()
            self.proxies[node] = proxy
            self.conditions[node] = base

    def url(self, node: str) -> str:
        """The broker URL ``node`` must use: its proxy's, with the real broker's scheme."""
        proxy = self.proxies[node]
        login = ""
        if self.broker.username is not None:  # the same credentials, through the proxy
            login = quote(self.broker.username, safe="")
            if self.broker.password is not None:
                login += ":" + quote(self.broker.password, safe="")
            login += "@"
        return f"{self.broker.scheme}://{login}{proxy.listen_host}:{proxy.port}"

    def longest_outage_s(self, node: str | None = None) -> float:
        """The longest time ``node``'s link (any node's, without one) is down on the timeline.

        It sizes publish deadlines and reassembly timeouts.
        """
        if node is None:
            return max(self._outages.values(), default=0.0)
        return self._outages.get(node, 0.0)

    def _longest_outages(self) -> dict[str, float]:
        longest: dict[str, float] = {}
        since: dict[str, float] = {}
        for ev in self.timeline:
            if ev.action in ("down", "crash"):
                since.setdefault(ev.node, ev.at_s)
            elif ev.action in ("up", "restart") and ev.node in since:
                gap = ev.at_s - since.pop(ev.node)
                longest[ev.node] = max(longest.get(ev.node, 0.0), gap)
        return longest

    def down_at_start(self) -> set[str]:
        """Nodes whose link the timeline takes down at time 0 (not worth waiting for)."""
        return {e.node for e in self.timeline if e.at_s == 0 and e.action in ("down", "crash")}

    async def run_timeline(self, started: float) -> None:
        """Apply every event at ``started`` (``time.monotonic()``) plus its ``at_s``."""
        for ev in self.timeline:
            wait = started + ev.at_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.apply(ev, time.monotonic() - started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed restart must not stop the rest of the replay
                log.warning("network event %s for %s failed: %r", ev.action, ev.node, exc)
                self.applied.append({**ev.to_dict(), "error": repr(exc)})

    async def apply(self, ev: NodeEvent, now_s: float) -> None:
        proxy = self.proxies[ev.node]
        record = {**ev.to_dict(), "applied_s": round(now_s, 3)}
        if ev.action == "link" and ev.conditions is not None:
            self.conditions[ev.node] = ev.conditions
            rto = self.network.rto_s
            proxy.set_link(ev.conditions.uplink(rto), ev.conditions.downlink(rto))
        elif ev.action == "down":
            self._down.add(ev.node)
            proxy.set_online(False)
        elif ev.action == "up":
            self._down.discard(ev.node)
            if ev.node not in self._crashed:
                proxy.set_online(True)
        elif ev.action == "crash":
            if ev.node in self._crashed:
                record["skipped"] = "already crashed"
            else:
                self._crashed.add(ev.node)
                proxy.set_online(False)  # the broker sees the TCP connection die: its will fires
                if self.on_crash is not None:
                    await self.on_crash(ev.node)
        elif ev.action == "restart":
            if ev.node not in self._crashed:
                record["skipped"] = "not crashed"
            else:
                self._crashed.discard(ev.node)
                if ev.node not in self._down:
                    proxy.set_online(True)
                if self.on_restart is not None:
                    await self.on_restart(ev.node)
        self.applied.append(record)

    def end(self, now_s: float) -> None:
        """The run is over (at ``now_s``): every link up again, so nodes can say goodbye."""
        for node, proxy in self.proxies.items():
            if not proxy.online:
                proxy.set_online(True)
                self.applied.append(
                    {
                        "node": node,
                        "action": "up",
                        "source": "end of run",
                        "applied_s": round(now_s, 3),
                    }
                )
        self._down.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per node: bytes relayed each way, connections, outages, connections cut."""
        return {
            node: {
                "bytes_up": p.stats.bytes_up,
                "bytes_down": p.stats.bytes_down,
                "connections": p.stats.connections,
                "outages": p.stats.outages,
                "dropped_by_outage": p.stats.dropped_by_outage,
                "refused": p.stats.refused,
            }
            for node, p in self.proxies.items()
        }

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.proxies.values()), return_exceptions=True)


def hash_seed(seed: int, node: str) -> int:
    """A per-node proxy seed that does not depend on Python's randomised ``hash()``."""
    value = seed & 0xFFFFFFFF
    for ch in node.encode():
        value = (value * 1_000_003 + ch) & 0xFFFFFFFF
    return value
