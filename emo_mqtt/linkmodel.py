"""The pure model of a network link: its conditions and the maths that schedules bytes.

:class:`LinkSpec` (bandwidth, latency, jitter, loss), :class:`TokenBucket` and
:class:`DelaySchedule` take the time as an argument and touch no socket, so scenario files
(:mod:`emo_mqtt.netscenario`) and configuration can use them without importing the asyncio
proxy that enforces them (:mod:`emo_mqtt.shaping`, whose docstring explains each effect).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from emo_mqtt.errors import ConfigError

#: Bytes read from a socket at once; also the token bucket's burst.
READ_SIZE = 64 * 1024

Jitter = Literal["uniform", "normal"]


@dataclass(frozen=True)
class LinkSpec:
    """The conditions of one direction of a link.

    ``bandwidth_bps`` is in **bytes** per second (``None``: unlimited); ``latency_s`` is the
    one-way delay; ``jitter_s`` its spread (see ``jitter``); ``loss`` the probability per
    chunk of a retransmission delay of ``rto_s`` (see the module docstring).
    """

    bandwidth_bps: float | None = None
    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    rto_s: float = 0.2
    jitter: Jitter = "uniform"

    def __post_init__(self) -> None:
        def bad(name: str, value: object, want: str) -> ConfigError:
            return ConfigError(f"link {name}: {value!r} is invalid, expected {want}")

        bw = self.bandwidth_bps
        if bw is not None and (isinstance(bw, bool) or not _finite(bw) or bw <= 0):
            raise bad("bandwidth_bps", bw, "a positive number of bytes/s or None")
        for name in ("latency_s", "jitter_s", "rto_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not _finite(value) or value < 0:
                raise bad(name, value, "a finite number of seconds >= 0")
        if isinstance(self.loss, bool) or not _finite(self.loss) or not 0 <= self.loss <= 1:
            raise bad("loss", self.loss, "a probability between 0 and 1")
        if self.jitter not in ("uniform", "normal"):
            raise bad("jitter", self.jitter, "'uniform' or 'normal'")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class TokenBucket:
    """A token bucket that schedules sends instead of refusing them.

    ``reserve(n, now)`` takes ``n`` tokens, going into debt if needed, and returns when the
    bytes may go: ``now`` if the bucket had them, else when the debt is paid back. Sends are
    thus served in order at ``rate`` bytes/s after an initial burst of ``burst`` bytes.
    """

    def __init__(self, rate: float | None, burst: float = READ_SIZE, now: float = 0.0) -> None:
        if burst <= 0:
            raise ConfigError(f"token bucket burst: {burst!r} is invalid, expected > 0")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def set_rate(self, rate: float | None, now: float, burst: float | None = None) -> None:
        """Change the rate (and the burst); tokens earned so far are kept at the old rate."""
        self._refill(now)
        self.rate = rate
        if burst is not None:
            self.burst = float(burst)
            self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        if self.rate is None:
            self._tokens = self.burst
        elif now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = max(self._stamp, now)

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` tokens and return the time at which they may be sent."""
        self._refill(now)
        if self.rate is None:
            return now
        self._tokens -= nbytes
        if self._tokens >= 0:
            return now
        return now + (-self._tokens) / self.rate


class DelaySchedule:
    """Release times for the chunks of one TCP stream: delayed, jittered, never reordered."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.last = -math.inf

    def delay(self, spec: LinkSpec) -> float:
        """One chunk's one-way delay: latency, jitter and perhaps a retransmission."""
        d = spec.latency_s
        if spec.jitter_s > 0:
            if spec.jitter == "uniform":
                d += self.rng.uniform(-spec.jitter_s, spec.jitter_s)
            else:
                d += self.rng.gauss(0.0, spec.jitter_s)
        d = max(0.0, d)
        # Draw even when loss is 0 so that changing loss does not shift later jitter draws.
        if self.rng.random() < spec.loss:
            d += spec.rto_s
        return d

    def release(self, ready: float, spec: LinkSpec) -> float:
        """When a chunk ready at ``ready`` reaches the other end (monotone in call order)."""
        self.last = max(self.last, ready + self.delay(spec))
        return self.last


def link_burst(rate: float | None) -> float:
    """The token bucket's burst for a link of ``rate`` bytes/s: 10 ms of it, 1500..READ_SIZE."""
    if rate is None:
        return float(READ_SIZE)
    return min(float(READ_SIZE), max(1500.0, rate * 0.01))
