"""FedAvg aggregation, update validation, per-round collection and client sampling.

Pure numpy. Aggregation is deterministic whatever order the updates arrive in: updates are
sorted by device id and accumulated in float64, so a server that receives them over MQTT in a
random order still produces bit-identical global models for the same set of updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from emo_mqtt.data import derive_seed
from emo_mqtt.errors import ConfigError, UpdateRejected

__all__ = [
    "RoundCollector",
    "RoundResult",
    "UpdateRejected",
    "fedavg",
    "sample_clients",
    "validate_update",
]

State = Mapping[str, np.ndarray]


def validate_update(
    reference_state: State,
    state: State,
    n_samples: int,
    max_norm_ratio: float | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``state`` can be averaged with ``reference_state``.

    Checks: same keys, shapes and dtypes; all values finite; ``n_samples`` a positive int; and,
    when ``max_norm_ratio`` is given, ``||state - reference|| <= max_norm_ratio * ||reference||``
    (global L2 over all floating arrays), which stops a diverged or malicious client from
    dragging the global model away in one round.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer):
        raise UpdateRejected(f"n_samples must be an int, got {type(n_samples).__name__}")
    if n_samples <= 0:
        raise UpdateRejected(f"n_samples must be > 0, got {n_samples}")
    if list(state.keys()) != list(reference_state.keys()):
        missing = sorted(set(reference_state) - set(state))
        extra = sorted(set(state) - set(reference_state))
        if missing or extra:
            raise UpdateRejected(f"keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    diff_sq, ref_sq = 0.0, 0.0
    for key, ref in reference_state.items():
        arr = state[key]
        if not isinstance(arr, np.ndarray):
            raise UpdateRejected(f"{key}: not an array ({type(arr).__name__})")
        if arr.shape != ref.shape:
            raise UpdateRejected(f"{key}: shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise UpdateRejected(f"{key}: dtype {arr.dtype}, expected {ref.dtype}")
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                raise UpdateRejected(f"{key}: non-finite values")
            if max_norm_ratio is not None:
                r64 = ref.astype(np.float64)
                diff_sq += float(np.sum((arr.astype(np.float64) - r64) ** 2))
                ref_sq += float(np.sum(r64**2))
    if max_norm_ratio is not None:
        ratio = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-12)
        if ratio > max_norm_ratio:
            raise UpdateRejected(f"update norm ratio {ratio:.3g} > {max_norm_ratio:g}")


def fedavg(
    updates: Sequence[tuple[str, State, int]],
    reference: State | None = None,
) -> dict[str, np.ndarray]:
    """Sample-weighted average of ``(device_id, state, n_samples)`` updates.

    Every update is validated against ``reference`` (default: the update of the smallest
    device id); any invalid update, a duplicate device id or an empty list raises
    :class:`UpdateRejected` (the caller decides whether to drop it and retry).
    The result keeps each array's dtype; integer arrays are rounded.
    """
    if not updates:
        raise UpdateRejected("no updates to aggregate")
    ordered = sorted(updates, key=lambda u: u[0])
    ids = [u[0] for u in ordered]
    if len(set(ids)) != len(ids):
        raise UpdateRejected(
            f"duplicate device ids: {sorted({i for i in ids if ids.count(i) > 1})}"
        )
    ref = reference if reference is not None else ordered[0][1]
    for device, state, n in ordered:
        try:
            validate_update(ref, state, n)
        except UpdateRejected as exc:
            raise UpdateRejected(exc.reason, device) from None
    total = float(sum(int(n) for _, _, n in ordered))
    out: dict[str, np.ndarray] = {}
    for key, ref_arr in ref.items():
        acc = np.zeros(ref_arr.shape, dtype=np.float64)
        for _, state, n in ordered:
            acc += state[key].astype(np.float64) * (int(n) / total)
        out[key] = (
            np.rint(acc).astype(ref_arr.dtype)
            if ref_arr.dtype.kind in "iub"
            else acc.astype(ref_arr.dtype)
        )
    return out


@dataclass(frozen=True)
class RoundResult:
    """An aggregated round: the new global ``state``, who contributed, with how many samples."""

    state: dict[str, np.ndarray]
    contributors: list[str]
    n_samples: int


@dataclass
class RoundCollector:
    """Collects the client updates of one FL round, with a straggler policy.

    The round is ready when every expected (sampled) device has reported, or when
    ``deadline_s`` has passed since ``started_at`` and at least ``min_updates`` were accepted.
    Only sampled devices count; a device's first valid update wins (a retransmission over MQTT,
    QoS 1 may deliver twice, never counts twice). Updates are validated against ``reference``
    (the global model of the round) when given. Times are the caller's clock (``now``), so a
    virtual clock works too.
    """

    round: int
    expected: Iterable[str]
    min_updates: int
    deadline_s: float
    started_at: float = 0.0
    reference: State | None = None
    max_norm_ratio: float | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    _expected: frozenset[str] = field(init=False)
    _updates: dict[str, tuple[State, int]] = field(init=False, default_factory=dict)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._expected = frozenset(self.expected)
        if not self._expected:
            raise ConfigError("a round needs at least one expected device")
        if not 1 <= self.min_updates <= len(self._expected):
            raise ConfigError(
                f"min_updates must be in 1..{len(self._expected)}, got {self.min_updates}"
            )
        if not self.deadline_s > 0:
            raise ConfigError(f"deadline_s must be > 0, got {self.deadline_s}")

    @property
    def received(self) -> list[str]:
        """Devices whose update was accepted, sorted."""
        return sorted(self._updates)

    @property
    def missing(self) -> list[str]:
        """Expected devices that have not (validly) reported yet, sorted."""
        return sorted(self._expected - set(self._updates))

    def add(self, device: str, state: State, n_samples: int, now: float) -> bool:
        """Offer one update; True if it was accepted (counts towards the round).

        Refused: devices not sampled for this round, duplicates, updates after
        :meth:`result`, and invalid updates (the reason lands in :attr:`rejected`).
        """
        del now  # late updates are still welcome until the round is closed
        if self._closed or device not in self._expected or device in self._updates:
            return False
        reference = self.reference
        if reference is None and self._updates:
            reference = next(iter(self._updates.values()))[0]
        try:
            if reference is not None:
                validate_update(reference, state, n_samples, self.max_norm_ratio)
            else:
                validate_update(state, state, n_samples)
        except UpdateRejected as exc:
            self.rejected[device] = exc.reason
            return False
        self._updates[device] = (state, int(n_samples))
        return True

    def ready(self, now: float) -> bool:
        """All expected devices reported, or the deadline passed with >= min_updates."""
        if len(self._updates) == len(self._expected):
            return True
        return now >= self.started_at + self.deadline_s and len(self._updates) >= self.min_updates

    def failed(self, now: float) -> bool:
        """The deadline passed with fewer than ``min_updates``: the round cannot complete."""
        return now >= self.started_at + self.deadline_s and len(self._updates) < self.min_updates

    def result(self) -> RoundResult:
        """Aggregate the accepted updates (FedAvg) and close the round."""
        if len(self._updates) < self.min_updates:
            raise UpdateRejected(
                f"round {self.round}: {len(self._updates)} updates < min_updates {self.min_updates}"
            )
        self._closed = True
        updates = [(d, s, n) for d, (s, n) in sorted(self._updates.items())]
        state = fedavg(updates, reference=self.reference)
        return RoundResult(state, [d for d, _, _ in updates], sum(n for _, _, n in updates))


def sample_clients(
    device_ids: Iterable[str], fraction_or_count: float | int, seed: int, round: int
) -> list[str]:
    """Deterministically sample the devices of ``round``; sorted.

    A float in (0, 1] is a fraction (rounded, at least one device); an int >= 1 is a count
    (so ``1`` means one device and ``1.0`` means all of them).
    """
    ids = sorted(set(device_ids))
    if not ids:
        raise ConfigError("no devices to sample from")
    if isinstance(fraction_or_count, bool):
        raise ConfigError("fraction_or_count must be a float fraction or an int count")
    if isinstance(fraction_or_count, int | np.integer):
        if fraction_or_count < 1:
            raise ConfigError(f"count must be >= 1, got {fraction_or_count}")
        k = min(int(fraction_or_count), len(ids))
    else:
        if not 0.0 < float(fraction_or_count) <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction_or_count}")
        # `round` is a parameter here; half-up rounding by hand.
        k = max(1, math.floor(float(fraction_or_count) * len(ids) + 0.5))
    if k == len(ids):
        return ids
    rng = np.random.default_rng(derive_seed(seed, "sample-clients", round))
    chosen = rng.choice(len(ids), size=k, replace=False)
    return sorted(ids[i] for i in chosen)
