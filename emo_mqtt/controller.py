"""Convergence-aware communication controller: how much activation traffic devices send.

Pure policy, no I/O. The server feeds it convergence signals once per FL round (activation
drift of the global trunk on probe data, FL training loss), the overlays feed it their replay
losses, and it answers, per device and round, a :class:`ControlDecision` (share of samples to
publish, publish interval, wire precision) that the server publishes on the control topic.

The policy is argued and measured in ``docs/algorithms.md``. In short: a device's dataset is
fixed, so after the first rounds every activation it publishes *replaces* one the overlay
already holds; the only reason to resend is that the cached copy went stale because the trunk
moved. The rate a device must publish at is therefore set by how fast the trunk moves (drift),
and the precision by the same yardstick: quantisation error is harmless while it stays small
next to the staleness error the cache tolerates anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from emo_mqtt.cache import Precision
from emo_mqtt.errors import ConfigError

__all__ = [
    "ControlDecision",
    "Controller",
    "ControllerConfig",
    "ConvergenceController",
    "FixedRule",
    "SendEverything",
    "activation_drift",
    "relative_improvement",
    "select_for_publish",
]


def activation_drift(prev_acts: np.ndarray, cur_acts: np.ndarray) -> float:
    """Relative L2 drift ``||cur - prev|| / ||prev||`` of trunk activations on the same probes.

    Computed by the server between consecutive global models on a fixed probe batch. It
    measures what staleness costs directly: how far a cached activation is from what the
    current trunk would produce for the same input.
    """
    prev = np.asarray(prev_acts, dtype=np.float64)
    cur = np.asarray(cur_acts, dtype=np.float64)
    if prev.shape != cur.shape:
        raise ConfigError(f"drift needs equal shapes, got {prev.shape} and {cur.shape}")
    return float(np.linalg.norm(cur - prev) / max(float(np.linalg.norm(prev)), 1e-12))


def relative_improvement(values: Sequence[float], window: int) -> float | None:
    """``(mean(previous window) - mean(last window)) / |mean(previous window)|``.

    Positive while a loss is falling; near zero on a plateau; None until ``2 * window``
    values exist. Window means rather than endpoints: replay losses are noisy.
    """
    if window < 1:
        raise ConfigError(f"window must be >= 1, got {window}")
    vals = [float(v) for v in values if math.isfinite(v)]
    if len(vals) < 2 * window:
        return None
    prev = float(np.mean(vals[-2 * window : -window]))
    cur = float(np.mean(vals[-window:]))
    return (prev - cur) / max(abs(prev), 1e-12)


@dataclass(frozen=True)
class ControlDecision:
    """What one device publishes: every ``interval``-th batch, ``fraction`` of its samples.

    The expected share of samples published is ``fraction / interval``.
    """

    fraction: float
    precision: Precision
    interval: int
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.interval < 1:
            raise ConfigError(f"interval must be >= 1, got {self.interval}")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"unknown precision {self.precision!r}")

    @property
    def share(self) -> float:
        """Expected share of the device's samples published."""
        return self.fraction / self.interval

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, for the control topic."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ControlDecision:
        try:
            return cls(
                float(data["fraction"]),  # type: ignore[arg-type]
                str(data["precision"]),  # type: ignore[arg-type]
                int(data["interval"]),  # type: ignore[call-overload]
                str(data.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad control decision {dict(data)!r}: {exc}") from exc


def select_for_publish(
    decision: ControlDecision, batch_index: int, batch_len: int, rng: np.random.Generator
) -> np.ndarray:
    """Positions (sorted) within a training batch whose activations a device publishes.

    Every ``interval``-th batch; within it ``fraction * batch_len`` samples, rounded
    stochastically so the expected rate is exact. ``rng`` must be the device's activation
    stream, never its training generator.
    """
    if batch_index % decision.interval != 0 or batch_len == 0:
        return np.zeros(0, dtype=np.int64)
    want = decision.fraction * batch_len
    k = min(batch_len, math.floor(want + rng.random()))
    if k >= batch_len:
        return np.arange(batch_len, dtype=np.int64)
    return np.sort(rng.choice(batch_len, size=k, replace=False)).astype(np.int64)


class Controller(Protocol):
    """What the server's control loop calls."""

    def observe_round(self, round: int, drift: float | None, fl_loss: float | None) -> None: ...

    def observe_overlay(self, overlay_id: str, round: int, loss: float) -> None: ...

    def decide(self, device_id: str, round: int) -> ControlDecision: ...


@dataclass(frozen=True)
class FixedRule:
    """An ablation of the controller: the same share and precision for every device and
    round, whatever the signals say (``emo_int8``: share 1 at int8; ``emo_fixed``: the
    scenario's ``fixed_share`` at ``fixed_precision``).

    A share below 1 is a fraction of every batch (interval 1): "every round, s of the
    samples", the rule the controller has to beat.
    """

    share: float
    precision: Precision
    name: str = "fixed"

    def __post_init__(self) -> None:
        # Validated like any decision (share in [0, 1], a known precision).
        ControlDecision(self.share, self.precision, 1, self.name)

    def observe_round(self, round: int, drift: float | None, fl_loss: float | None) -> None:
        del round, drift, fl_loss

    def observe_overlay(self, overlay_id: str, round: int, loss: float) -> None:
        del overlay_id, round, loss

    def decide(self, device_id: str, round: int) -> ControlDecision:
        del device_id, round
        return ControlDecision(self.share, self.precision, 1, self.name)


@dataclass(frozen=True)
class SendEverything(FixedRule):
    """The baseline: every sample, every batch, fp32 (the fixed rule that saves nothing)."""

    share: float = 1.0
    precision: Precision = "fp32"
    name: str = "send-everything"


@dataclass(frozen=True)
class ControllerConfig:
    """Parameters of :class:`ConvergenceController` (the defaults are the benchmarked ones).

    - ``warmup_rounds``: the most the controller ever sends, ``max_fraction`` (no drift
      measured yet, and the overlay starts empty), at ``warmup_precision``: int8, because
      the first rounds have the largest drift of all (0.7 then 0.3 in the benchmark), next
      to which int8's error (~0.7%) vanishes.
    - ``max_fraction`` 0.5: more than half the samples in a round buys nothing measurable.
      With ``max_staleness`` 3 a share of 0.5 per round already refreshes about 94 % of a
      device's samples within the staleness window, and what a fast-moving trunk produces
      goes stale before it is replayed much. Tuned on validation data (docs/algorithms.md
      section 6): a cap of 1 sent 1.5x the bytes for no better accuracy.
    - share of samples = ``drift / staleness_budget``: a cached activation k rounds old is about
      ``k * drift`` away from what the current trunk would give; refreshing a share s of the
      samples per round makes the mean age about 1/s, so the mean staleness error is about
      ``drift / s``. Keeping it at ``staleness_budget`` gives the rule.
    - raised to ``fl_gain / fl_fast`` while the FL loss still falls fast (relative gain over
      ``fl_window`` rounds): a second witness that the trunk is still moving.
    - times ``plateau_factor`` for devices whose overlay's replay loss improved by less than
      ``plateau_threshold`` over ``overlay_window`` observations.
    - never below the coverage floor: the overlay trains only on entries at most
      ``max_staleness`` rounds old, so at least ``1 - (1 - min_coverage) ** (1 /
      (max_staleness + 1))`` per round keeps ``min_coverage`` of each device's samples usable;
      and never below ``min_fraction``.
    - precision: the cheapest whose relative error (``quant_error``, measured on cut-layer
      activations) is at most ``precision_budget * drift``; quantisation noise then stays
      no larger than one round of staleness, which the cache tolerates anyway. A budget of
      1 (int8 while drift is above int8's own error, ~0.01) replaced 0.2 (fp16 below drift
      0.05), which doubled the bytes of the late rounds for no measurable accuracy.
    - below ``min_batch_share`` the share is sent as a larger fraction of every k-th batch:
      fewer, larger messages (per-message overhead on MQTT is not negligible).
    """

    warmup_rounds: int = 2
    warmup_precision: Precision = "int8"
    max_fraction: float = 0.5
    min_fraction: float = 0.05
    staleness_budget: float = 0.25
    max_staleness: int = 3
    min_coverage: float = 0.5
    fl_window: int = 2
    fl_fast: float = 0.5
    overlay_window: int = 3
    plateau_threshold: float = 0.02
    plateau_factor: float = 0.5
    quant_error: tuple[tuple[Precision, float], ...] = (("int8", 0.01), ("fp16", 0.001))
    precision_budget: float = 1.0
    min_batch_share: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 < self.min_fraction <= self.max_fraction <= 1.0:
            raise ConfigError("need 0 < min_fraction <= max_fraction <= 1")
        if not self.staleness_budget > 0 or not self.precision_budget > 0:
            raise ConfigError("staleness_budget and precision_budget must be > 0")
        if not 0.0 <= self.min_coverage < 1.0 or self.max_staleness < 0:
            raise ConfigError("need 0 <= min_coverage < 1 and max_staleness >= 0")
        if not 0.0 < self.plateau_factor <= 1.0:
            raise ConfigError("plateau_factor must be in (0, 1]")
        if self.warmup_rounds < 0 or self.fl_window < 1 or self.overlay_window < 1:
            raise ConfigError("warmup_rounds >= 0 and windows >= 1 required")
        if not 0.0 < self.min_batch_share <= 1.0:
            raise ConfigError("min_batch_share must be in (0, 1]")
        if self.warmup_precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"unknown precision {self.warmup_precision!r}")

    @property
    def floor(self) -> float:
        """The least share of samples per round (coverage floor or ``min_fraction``)."""
        coverage = 1.0 - float((1.0 - self.min_coverage) ** (1.0 / (self.max_staleness + 1)))
        return min(self.max_fraction, max(self.min_fraction, coverage))


@dataclass
class ConvergenceController:
    """Sets each device's activation rate and precision from convergence signals.

    Deterministic: the decision is a pure function of the observations made so far.
    ``assignment`` maps device ids to the overlay that serves them (for the plateau signal);
    devices without one are cut only when every overlay has plateaued.
    """

    config: ControllerConfig = field(default_factory=ControllerConfig)
    assignment: dict[str, str] = field(default_factory=dict)
    _drift: dict[int, float] = field(default_factory=dict, init=False)
    _fl_loss: dict[int, float] = field(default_factory=dict, init=False)
    _overlay: dict[str, dict[int, float]] = field(default_factory=dict, init=False)

    def state(self) -> dict[str, object]:
        """The observations made so far, JSON-ready (for a server's checkpoint)."""
        return {
            "drift": dict(self._drift),
            "fl_loss": dict(self._fl_loss),
            "overlay": {o: dict(v) for o, v in self._overlay.items()},
        }

    def restore(self, state: Mapping[str, object]) -> None:
        """Take back observations from :meth:`state` (JSON turns round keys into strings)."""

        def rounds(series: object) -> dict[int, float]:
            return {int(k): float(v) for k, v in dict(series).items()}  # type: ignore[call-overload]

        self._drift = rounds(state["drift"])
        self._fl_loss = rounds(state["fl_loss"])
        self._overlay = {str(o): rounds(s) for o, s in dict(state["overlay"]).items()}  # type: ignore[call-overload]

    def assign(self, device_id: str, overlay_id: str) -> None:
        """Record that ``overlay_id`` serves ``device_id``."""
        self.assignment[device_id] = overlay_id

    def observe_round(self, round: int, drift: float | None, fl_loss: float | None) -> None:
        """Signals of FL round ``round``: drift of the global trunk it produced from the one
        before (None when unknown), and the mean training loss the devices reported."""
        if drift is not None and math.isfinite(drift):
            self._drift[round] = float(drift)
        if fl_loss is not None and math.isfinite(fl_loss):
            self._fl_loss[round] = float(fl_loss)

    def observe_overlay(self, overlay_id: str, round: int, loss: float) -> None:
        """An overlay's mean replay loss while the FL model was at ``round`` (last one wins)."""
        if math.isfinite(loss):
            self._overlay.setdefault(overlay_id, {})[round] = float(loss)

    def _series(self, data: Mapping[int, float], round: int) -> list[float]:
        return [data[r] for r in sorted(data) if r < round]

    def _plateaued(self, overlay_id: str, round: int) -> bool:
        losses = self._series(self._overlay.get(overlay_id, {}), round)
        gain = relative_improvement(losses, self.config.overlay_window)
        return gain is not None and gain < self.config.plateau_threshold

    def precision_for(self, drift: float) -> Precision:
        """The cheapest precision whose error fits ``precision_budget * drift``."""
        for precision, error in self.config.quant_error:
            if error <= self.config.precision_budget * drift:
                return precision
        return "fp32"

    def decide(self, device_id: str, round: int) -> ControlDecision:
        """The decision for ``device_id`` while it trains in FL round ``round``.

        Uses the signals of rounds before ``round`` only (those exist when it starts).
        """
        cfg = self.config
        drifts = self._series(self._drift, round)
        if round < cfg.warmup_rounds or not drifts:
            return ControlDecision(cfg.max_fraction, cfg.warmup_precision, 1, "warmup")
        drift = drifts[-1]
        share = drift / cfg.staleness_budget
        reason = f"drift={drift:.3g}"
        fl_gain = relative_improvement(self._series(self._fl_loss, round), cfg.fl_window)
        if fl_gain is not None and fl_gain / cfg.fl_fast > share:
            share = fl_gain / cfg.fl_fast
            reason += f" fl_gain={fl_gain:.3g}"
        overlay = self.assignment.get(device_id)
        overlays = [overlay] if overlay is not None else sorted(self._overlay)
        if overlays and all(self._plateaued(o, round) for o in overlays):
            share *= cfg.plateau_factor
            reason += " overlay-plateau"
        share = min(cfg.max_fraction, max(cfg.floor, share))
        interval = 1
        if share < cfg.min_batch_share:
            interval = math.ceil(cfg.min_batch_share / share - 1e-9)
        fraction = min(1.0, share * interval)
        return ControlDecision(fraction, self.precision_for(drift), interval, reason)
