"""FedAvg aggregation, update validation, per-round collection and client sampling.

Pure numpy. Aggregation is deterministic whatever order the updates arrive in: updates are
sorted by device id and accumulated in float64, so a server that receives them over MQTT in a
random order still produces bit-identical global models for the same set of updates.

One device must not be able to poison the global model (issue 11). Three defences, each
optional, none changing a bit of an honest FedAvg run:

* **Weight caps tied to the data plan** (``RoundCollector(max_samples=...)``): a device's
  sample count weighs at most its planned share times the local epochs, however many
  samples it claims (``10**15`` included);
* **a norm bound against a reference a bad round cannot zero** (``norm_reference``, kept
  across rounds by :class:`NormReference`: the median L2 norm of the last global models),
  so a zeroed global model does not turn the bound against every honest update after it;
* **robust aggregators** (``aggregator="median"`` or ``"trimmed_mean"``, as Flower's
  FedMedian and FedTrimmedAvg): coordinate-wise, unweighted, so a single update, however
  large or weighted, moves no coordinate past the honest ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from emo_mqtt.data import derive_seed
from emo_mqtt.errors import ConfigError, UpdateRejected

__all__ = [
    "AGGREGATORS",
    "NormReference",
    "RoundCollector",
    "RoundResult",
    "UpdateRejected",
    "aggregate",
    "coordinate_median",
    "fedavg",
    "sample_clients",
    "state_norm",
    "trimmed_mean",
    "validate_update",
]

#: The aggregators a scenario may select (``fleet.aggregator``).
AGGREGATORS = ("fedavg", "median", "trimmed_mean")

State = Mapping[str, np.ndarray]


def validate_update(
    reference_state: State,
    state: State,
    n_samples: int,
    max_norm_ratio: float | None = None,
    reference_norm: float | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``state`` can be averaged with ``reference_state``.

    Checks: same keys, shapes and dtypes; all values finite; ``n_samples`` a positive int; and,
    when ``max_norm_ratio`` is given, ``||state - reference|| <= max_norm_ratio * N``
    (global L2 over all floating arrays), which stops a diverged or malicious client from
    dragging the global model away in one round. ``N`` is ``reference_norm`` when given
    (see :class:`NormReference`), else ``||reference||``.
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
        norm = math.sqrt(ref_sq) if reference_norm is None else reference_norm
        ratio = math.sqrt(diff_sq) / max(norm, 1e-12)
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
    ordered, ref = _checked(updates, reference)
    total = float(sum(int(n) for _, _, n in ordered))
    out: dict[str, np.ndarray] = {}
    for key, ref_arr in ref.items():
        acc = np.zeros(ref_arr.shape, dtype=np.float64)
        for _, state, n in ordered:
            acc += state[key].astype(np.float64) * (int(n) / total)
        out[key] = _cast(acc, ref_arr)
    return out


def _checked(
    updates: Sequence[tuple[str, State, int]], reference: State | None
) -> tuple[list[tuple[str, State, int]], State]:
    """Updates sorted by device id and validated; the reference they were checked against."""
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
    return ordered, ref


def _cast(acc: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``acc`` (float64) in ``like``'s dtype; integer arrays are rounded."""
    return np.rint(acc).astype(like.dtype) if like.dtype.kind in "iub" else acc.astype(like.dtype)


def coordinate_median(
    updates: Sequence[tuple[str, State, int]], reference: State | None = None
) -> dict[str, np.ndarray]:
    """Coordinate-wise median of the updates (unweighted: sample counts are ignored).

    Each coordinate takes the median of the devices' values (the mean of the two middle
    ones for an even count), so fewer than half the devices cannot move it outside the
    range of the honest ones. Validation as for :func:`fedavg`.
    """
    ordered, ref = _checked(updates, reference)
    return {
        key: _cast(
            np.median(np.stack([s[key].astype(np.float64) for _, s, _ in ordered]), axis=0), ref_arr
        )
        for key, ref_arr in ref.items()
    }


def trimmed_mean(
    updates: Sequence[tuple[str, State, int]],
    trim_fraction: float = 0.1,
    reference: State | None = None,
) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (unweighted): drop the ``k`` largest and ``k`` smallest
    values of each coordinate, ``k = floor(trim_fraction * n)`` but at least one when
    ``trim_fraction > 0`` and ``n >= 3`` (so one outlier is always cut), then average.

    With ``n`` updates, up to ``k`` outliers per side are cut out of every coordinate.
    Validation as for :func:`fedavg`.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ConfigError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    ordered, ref = _checked(updates, reference)
    n = len(ordered)
    k = math.floor(trim_fraction * n)
    if trim_fraction > 0 and n >= 3:
        k = max(k, 1)
    k = min(k, (n - 1) // 2)
    out: dict[str, np.ndarray] = {}
    for key, ref_arr in ref.items():
        stacked = np.sort(np.stack([s[key].astype(np.float64) for _, s, _ in ordered]), axis=0)
        out[key] = _cast(stacked[k : n - k].mean(axis=0), ref_arr)
    return out


def aggregate(
    updates: Sequence[tuple[str, State, int]],
    aggregator: str = "fedavg",
    *,
    trim_fraction: float = 0.1,
    reference: State | None = None,
) -> dict[str, np.ndarray]:
    """Aggregate with the named aggregator (one of :data:`AGGREGATORS`)."""
    if aggregator == "fedavg":
        return fedavg(updates, reference=reference)
    if aggregator == "median":
        return coordinate_median(updates, reference=reference)
    if aggregator == "trimmed_mean":
        return trimmed_mean(updates, trim_fraction, reference=reference)
    raise ConfigError(f"unknown aggregator {aggregator!r}; known: {list(AGGREGATORS)}")


def state_norm(state: State) -> float:
    """Global L2 norm of a model state's floating arrays (float64 accumulation)."""
    return math.sqrt(
        sum(float(np.sum(a.astype(np.float64) ** 2)) for a in state.values() if a.dtype.kind == "f")
    )


class NormReference:
    """The norm the update bound is measured against: the median L2 norm of the global
    models of the last ``window`` rounds (the initial model included).

    A round whose aggregate was zeroed (or blown up) by a poisoned update is one value of
    ``window``: the median does not follow it, so the bound of the rounds after it still
    admits honest updates. The server keeps one across rounds: :meth:`observe` each new
    global model, pass :attr:`value` to the next :class:`RoundCollector`.
    """

    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        self.window = window
        self._norms: list[float] = []

    def observe(self, state: State) -> float:
        """Record the norm of a new global model; the reference value after it."""
        self._norms = [*self._norms, state_norm(state)][-self.window :]
        return float(np.median(self._norms))

    @property
    def value(self) -> float | None:
        """The median of the recorded norms (None before the first :meth:`observe`)."""
        return float(np.median(self._norms)) if self._norms else None

    @property
    def norms(self) -> list[float]:
        """The recorded norms, oldest first (what a checkpoint keeps)."""
        return list(self._norms)

    def restore(self, norms: Iterable[float]) -> None:
        """Take back :attr:`norms` from a checkpoint (the last ``window`` finite ones)."""
        kept = [float(n) for n in norms if math.isfinite(float(n)) and float(n) >= 0]
        self._norms = kept[-self.window :]


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

    Against a poisoning device (all optional; defaults keep plain FedAvg):

    * ``max_samples``: device id -> the most samples its update may weigh (its planned
      share of the data times the local epochs). A claim above it is weighed at the cap
      (noted in :attr:`capped`); a sampled device missing from the map is refused.
    * ``norm_reference``: the norm ``max_norm_ratio`` is measured against instead of the
      round's global model's own (:class:`NormReference`: robust to a zeroed model).
    * ``aggregator`` (one of :data:`AGGREGATORS`) and ``trim_fraction``: how
      :meth:`result` combines the accepted updates.
    """

    round: int
    expected: Iterable[str]
    min_updates: int
    deadline_s: float
    started_at: float = 0.0
    reference: State | None = None
    max_norm_ratio: float | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    max_samples: Mapping[str, int] | None = None
    norm_reference: float | None = None
    aggregator: str = "fedavg"
    trim_fraction: float = 0.1
    #: Devices whose claimed sample count was above their cap: device -> (claimed, cap).
    capped: dict[str, tuple[int, int]] = field(default_factory=dict)
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
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"unknown aggregator {self.aggregator!r}; known: {list(AGGREGATORS)}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")

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
                validate_update(
                    reference, state, n_samples, self.max_norm_ratio, self.norm_reference
                )
            else:
                validate_update(state, state, n_samples)
            weight = self._weight(device, int(n_samples))
        except UpdateRejected as exc:
            self.rejected[device] = exc.reason
            return False
        self._updates[device] = (state, weight)
        return True

    def _weight(self, device: str, n_samples: int) -> int:
        """The weight of ``device``'s update: its claimed samples, capped by the data plan."""
        if self.max_samples is None:
            return n_samples
        cap = self.max_samples.get(device)
        if cap is None:
            raise UpdateRejected("no share of the data plan: its samples cannot be weighed")
        if n_samples > cap:
            self.capped[device] = (n_samples, cap)
            return cap
        return n_samples

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
        state = aggregate(
            updates, self.aggregator, trim_fraction=self.trim_fraction, reference=self.reference
        )
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
