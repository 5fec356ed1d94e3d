"""The hierarchical activation replay cache: device outbox, overlay replay buffer, disk spill.

Tiers (the MQTT topic tree mirrors them; this module is pure and does no I/O but the spill
tier's own files):

- :class:`DeviceOutbox` (device): a byte-bounded FIFO of activation batches waiting to be
  published. IoT memory is small, so when the link is slower than training the oldest
  batches go first: they are the stalest.
- :class:`ReplayCache` (overlay): a bounded replay buffer keyed by ``(device_id, sample_id)``,
  each entry tagged with the FL round (trunk version) that produced it; preallocated numpy
  storage; evicts stalest-round-first; samples only entries within a staleness bound.
- :class:`~emo_mqtt.spill.SpillTier` (above the overlay, in ``emo_mqtt.spill``): a
  byte-bounded directory of ``.npz`` blocks that receives the overlay's capacity evictions
  and refills it when too few fresh entries remain. No pickle: ``allow_pickle=False``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, NotRequired, Protocol, TypedDict, TypeVar

import numpy as np

from emo_mqtt.errors import ConfigError
from emo_mqtt.spill import SpillBlock, SpillStats, SpillTier

__all__ = [
    "ActivationBatch",
    "CacheStats",
    "DeviceOutbox",
    "Occupancy",
    "OutboxStats",
    "Precision",
    "PutResult",
    "ReplayCache",
    "SpillBlock",
    "SpillStats",
    "SpillTier",
]

Precision = Literal["fp32", "fp16", "int8"]


class _HasNbytes(Protocol):
    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=_HasNbytes)


@dataclass(frozen=True)
class ActivationBatch:
    """Activations a device publishes: ``data`` in the wire precision, plus their identity.

    ``data`` is (n, *activation_shape) float32 (fp32), float16 (fp16) or int8 codes (int8, with
    a float32 per-sample ``scale`` so that ``activation = code * scale``).
    """

    round: int
    sample_ids: np.ndarray
    labels: np.ndarray
    data: np.ndarray
    scale: np.ndarray | None = None

    @property
    def precision(self) -> Precision:
        if self.data.dtype == np.int8:
            return "int8"
        return "fp16" if self.data.dtype == np.float16 else "fp32"

    @property
    def nbytes(self) -> int:
        """Payload bytes (activations, scales, ids, labels), the figure the controller saves."""
        extra = 0 if self.scale is None else self.scale.nbytes
        return int(self.data.nbytes + extra + self.sample_ids.nbytes + self.labels.nbytes)

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def activations(self) -> np.ndarray:
        """The activations as float32 (dequantised)."""
        if self.scale is None:
            return self.data.astype(np.float32)
        shape = (-1,) + (1,) * (self.data.ndim - 1)
        out: np.ndarray = self.data.astype(np.float32) * self.scale.reshape(shape)
        return out

    @classmethod
    def quantize(
        cls,
        round: int,
        sample_ids: np.ndarray,
        activations: np.ndarray,
        labels: np.ndarray,
        precision: Precision,
    ) -> ActivationBatch:
        """Encode float activations at ``precision``.

        int8 is symmetric per sample (scale = max|a| / 127): one scale per sample keeps the
        error relative to each sample's own range, at 4 bytes of overhead per sample.
        """
        acts = np.asarray(activations, dtype=np.float32)
        ids = np.asarray(sample_ids, dtype=np.int64)
        ys = np.asarray(labels, dtype=np.int64)
        if acts.shape[0] != ids.shape[0] or ys.shape != ids.shape:
            raise ConfigError(f"batch sizes differ: {acts.shape}, {ids.shape}, {ys.shape}")
        if precision == "fp32":
            return cls(round, ids, ys, acts.copy())
        if precision == "fp16":
            return cls(round, ids, ys, acts.astype(np.float16))
        if precision != "int8":
            raise ConfigError(f"unknown precision {precision!r}")
        flat = acts.reshape(acts.shape[0], -1)
        peak = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(flat.shape[0])
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
        return cls(round, ids, ys, codes.reshape(acts.shape), scale)


# ----------------------------------------------------------------------------- device tier


@dataclass
class OutboxStats:
    """Counters of a :class:`DeviceOutbox`."""

    pushed: int = 0
    popped: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    dropped: int = 0


class DeviceOutbox(Generic[T]):
    """Byte-bounded FIFO of pending batches (anything with ``nbytes``) on a device.

    :meth:`push` evicts the oldest batches until the new one fits; a batch larger than the
    whole outbox is dropped (``stats.dropped``). Never blocks: training never waits on it.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ConfigError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.stats = OutboxStats()
        self._items: deque[T] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def push(self, item: T) -> int:
        """Queue ``item``; returns how many older batches were evicted to make room."""
        size = int(item.nbytes)
        self.stats.pushed += 1
        if size > self.max_bytes:
            self.stats.dropped += 1
            return 0
        evicted = 0
        while self._bytes + size > self.max_bytes:
            old = self._items.popleft()
            self._bytes -= int(old.nbytes)
            self.stats.evicted_bytes += int(old.nbytes)
            evicted += 1
        self.stats.evicted += evicted
        self._items.append(item)
        self._bytes += size
        return evicted

    def pop(self) -> T | None:
        """The oldest pending batch, or None."""
        if not self._items:
            return None
        item = self._items.popleft()
        self._bytes -= int(item.nbytes)
        self.stats.popped += 1
        return item

    def pop_all(self) -> list[T]:
        """Every pending batch, oldest first."""
        items = list(self._items)
        self._items.clear()
        self._bytes = 0
        self.stats.popped += len(items)
        return items


# ---------------------------------------------------------------------------- overlay tier


class Occupancy(TypedDict):
    """What :meth:`ReplayCache.occupancy` reports."""

    entries: int
    capacity: int
    bytes: int
    capacity_bytes: int
    by_device: dict[str, int]
    mean_staleness: NotRequired[float]


@dataclass(frozen=True)
class PutResult:
    """What one :meth:`ReplayCache.put` did, in entries."""

    inserted: int
    replaced: int
    evicted: int
    skipped: int = 0  # the cache already held a newer version of that key


@dataclass
class CacheStats:
    """Cumulative counters of a :class:`ReplayCache`."""

    offered: int = 0  # entries offered to the memory tier, by puts and refills
    inserted: int = 0
    replaced: int = 0
    skipped: int = 0
    evicted: int = 0  # capacity evictions, including incoming rows that lost (``dropped``)
    dropped: int = 0
    spilled: int = 0
    refilled: int = 0
    purged: int = 0
    sampled_batches: int = 0
    sampled_entries: int = 0


class ReplayCache:
    """Bounded replay buffer of cut-layer activations, keyed by ``(device_id, sample_id)``.

    Storage is preallocated: ``capacity`` rows of ``prod(activation_shape)`` values in
    ``dtype`` (float16 halves memory; its rounding error, ~1e-3 relative, is far below the
    drift between trunk versions). Each entry carries its label, the FL round that produced it
    and an insertion sequence number.

    Policy:
    - same key: the entry from the newer (or same) round replaces the older one; an older
      version than the one held is skipped;
    - full: the stalest round goes first, ties oldest insertion first, counting the incoming
      entries as candidates (a late batch staler than everything held is not inserted);
      capacity evictions go to the spill tier when one is attached;
    - sampling draws only entries with ``current_round - round <= max_staleness``.
    """

    def __init__(
        self,
        capacity: int,
        activation_shape: Sequence[int],
        *,
        dtype: Literal["float16", "float32"] = "float16",
        spill: SpillTier | None = None,
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"capacity must be >= 1, got {capacity}")
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be float16 or float32, got {dtype!r}")
        self.capacity = int(capacity)
        self.activation_shape = tuple(int(d) for d in activation_shape)
        self.dim = math.prod(self.activation_shape)
        if self.dim < 1:
            raise ConfigError(f"bad activation shape {activation_shape!r}")
        self.spill = spill
        self.stats = CacheStats()
        self._acts = np.zeros((self.capacity, self.dim), dtype=np.dtype(dtype))
        self._labels = np.zeros(self.capacity, dtype=np.int64)
        self._rounds = np.zeros(self.capacity, dtype=np.int64)
        self._seq = np.zeros(self.capacity, dtype=np.int64)
        self._valid = np.zeros(self.capacity, dtype=bool)
        self._keys: list[tuple[str, int] | None] = [None] * self.capacity
        self._slot: dict[tuple[str, int], int] = {}
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: object) -> bool:
        return key in self._slot

    def round_of(self, device_id: str, sample_id: int) -> int | None:
        """The round of the cached entry for that key, or None."""
        slot = self._slot.get((device_id, int(sample_id)))
        return None if slot is None else int(self._rounds[slot])

    # -- writes ---------------------------------------------------------------------------

    def _free_slot(self, slot: int) -> None:
        key = self._keys[slot]
        if key is not None:
            del self._slot[key]
        self._keys[slot] = None
        self._valid[slot] = False
        self._free.append(slot)

    def _write(
        self, slot: int, key: tuple[str, int], act: np.ndarray, label: int, rnd: int
    ) -> None:
        self._acts[slot] = act
        self._labels[slot] = label
        self._rounds[slot] = rnd
        self._seq[slot] = self._next_seq
        self._next_seq += 1
        self._valid[slot] = True
        self._keys[slot] = key
        self._slot[key] = slot

    def put(
        self,
        device_id: str,
        sample_ids: np.ndarray | Sequence[int],
        activations: np.ndarray,
        labels: np.ndarray | Sequence[int],
        round: int,
    ) -> PutResult:
        """Insert one device's batch of activations from FL round ``round``."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        ys = np.asarray(labels, dtype=np.int64).reshape(-1)
        acts = np.asarray(activations)
        if acts.dtype.kind != "f":
            raise ConfigError(f"activations must be floating point, got {acts.dtype}")
        if (
            ys.shape != ids.shape
            or acts.shape[:1] != ids.shape
            or acts[0:1].size not in (0, self.dim)
        ):
            raise ConfigError(
                f"put: {ids.shape[0]} ids, labels {ys.shape}, activations {acts.shape}; "
                f"want (n, {self.activation_shape})"
            )
        acts = acts.reshape(ids.shape[0], self.dim)
        if not np.all(np.isfinite(acts)):
            raise ConfigError("put: non-finite activations")
        block = SpillBlock(
            np.full(ids.shape[0], device_id),
            ids,
            acts,
            ys,
            np.full(ids.shape[0], int(round), dtype=np.int64),
        )
        return self._insert(block, spill_evictions=True)

    def _insert(self, block: SpillBlock, *, spill_evictions: bool) -> PutResult:
        n = len(block)
        self.stats.offered += n
        # Within one batch the last occurrence of a key wins.
        keys = [(str(d), int(s)) for d, s in zip(block.device_ids, block.sample_ids, strict=True)]
        last = {k: i for i, k in enumerate(keys)}
        replaced = skipped = 0
        new_rows: list[int] = []
        for key, i in last.items():
            slot = self._slot.get(key)
            if slot is None:
                new_rows.append(i)
            elif block.rounds[i] >= self._rounds[slot]:
                self._write(
                    slot, key, block.activations[i], int(block.labels[i]), int(block.rounds[i])
                )
                replaced += 1
            else:
                skipped += 1
        skipped += n - len(last)
        evict_existing, drop_rows = self._choose_evictions(block, new_rows)
        evicted_blocks = []
        if evict_existing.size:
            evicted_blocks.append(self._extract(evict_existing))
            for slot in evict_existing:
                self._free_slot(int(slot))
        dropped = set(drop_rows)
        kept = [i for i in new_rows if i not in dropped]
        if dropped:
            evicted_blocks.append(block.select(np.asarray(sorted(dropped), dtype=np.int64)))
        for i in kept:
            self._write(
                self._free.pop(),
                keys[i],
                block.activations[i],
                int(block.labels[i]),
                int(block.rounds[i]),
            )
        n_evicted = int(evict_existing.size) + len(dropped)
        self.stats.inserted += len(kept)
        self.stats.replaced += replaced
        self.stats.skipped += skipped
        self.stats.evicted += n_evicted
        self.stats.dropped += len(dropped)
        if spill_evictions and self.spill is not None and evicted_blocks:
            spilled = SpillBlock.concatenate(evicted_blocks)
            self.spill.write(spilled)
            self.stats.spilled += len(spilled)
        return PutResult(len(kept), replaced, n_evicted, skipped)

    def _choose_evictions(
        self, block: SpillBlock, new_rows: list[int]
    ) -> tuple[np.ndarray, list[int]]:
        """Slots to evict and incoming rows to drop so that the new rows fit.

        Candidates are held entries plus incoming rows, ordered by (round, insertion order);
        incoming rows count as inserted after everything held.
        """
        need = len(new_rows) - len(self._free)
        if need <= 0:
            return np.zeros(0, dtype=np.int64), []
        held = np.flatnonzero(self._valid)
        rows = np.asarray(new_rows, dtype=np.int64)
        rounds = np.concatenate([self._rounds[held], block.rounds[rows]])
        order_key = np.concatenate([self._seq[held], self._next_seq + np.arange(rows.size)])
        victims = np.lexsort((order_key, rounds))[:need]
        is_held = victims < held.size
        return held[victims[is_held]], [int(rows[v - held.size]) for v in victims[~is_held]]

    def _extract(self, slots: np.ndarray) -> SpillBlock:
        keys = [self._keys[int(s)] for s in slots]
        return SpillBlock(
            np.array([k[0] for k in keys if k is not None]),
            np.array([k[1] for k in keys if k is not None], dtype=np.int64),
            self._acts[slots].copy(),
            self._labels[slots].copy(),
            self._rounds[slots].copy(),
        )

    def snapshot(self) -> SpillBlock:
        """Every entry held, oldest insertion first (so a restore keeps the eviction order)."""
        slots = np.array(
            sorted(self._slot.values(), key=lambda s: int(self._seq[s])), dtype=np.int64
        )
        return self._extract(slots)

    def purge_stale(self, current_round: int, max_staleness: int) -> int:
        """Drop (not spill: they are useless) entries older than ``max_staleness`` rounds."""
        stale = np.flatnonzero(self._valid & (current_round - self._rounds > max_staleness))
        for slot in stale:
            self._free_slot(int(slot))
        self.stats.purged += int(stale.size)
        return int(stale.size)

    def refill(self, current_round: int, max_staleness: int) -> int:
        """Pull fresh entries back from the spill tier into free or stale slots; the count."""
        if self.spill is None:
            return 0
        self.purge_stale(current_round, max_staleness)
        room = len(self._free)
        if room == 0:
            return 0
        block = self.spill.take(current_round, max_staleness, room)
        if block is None:
            return 0
        result = self._insert(block, spill_evictions=False)
        self.stats.refilled += result.inserted + result.replaced
        return result.inserted + result.replaced

    def rotate(self, current_round: int, max_staleness: int, limit: int) -> int:
        """Swap up to ``limit`` fresh entries of the spill tier with the entries held longest.

        What overflowed to disk is part of the replay set, not a graveyard: each call
        brings fresh spilled entries back (into free slots first, then in place of the
        entries inserted longest ago, which go to the spill tier in turn), so that over
        successive rounds the overlay replays everything its devices sent within the
        staleness bound, not only the newest ``capacity`` entries. Returns the entries
        brought back (0 without a spill tier or with nothing fresh on it).
        """
        if self.spill is None:
            return 0
        self.purge_stale(current_round, max_staleness)
        if limit < 1 or not self.spill.blocks:
            return 0
        # Oldest blocks first: what this call swaps out is written as the newest block, so
        # successive calls cycle through the whole tier instead of taking it straight back.
        block = self.spill.take(
            current_round, max_staleness, min(int(limit), self.capacity), oldest_first=True
        )
        if block is None:
            return 0
        need = len(block) - len(self._free)
        if need > 0:
            held = np.flatnonzero(self._valid)
            out = held[np.argsort(self._seq[held], kind="stable")[:need]]
            outgoing = self._extract(out)
            for slot in out:
                self._free_slot(int(slot))
            self.stats.evicted += int(out.size)
            self.spill.write(outgoing)
            self.stats.spilled += len(outgoing)
        result = self._insert(block, spill_evictions=False)
        self.stats.refilled += result.inserted + result.replaced
        return result.inserted + result.replaced

    # -- reads ----------------------------------------------------------------------------

    def fresh_count(self, current_round: int, max_staleness: int) -> int:
        """Entries within the staleness bound."""
        return int(np.count_nonzero(self._valid & (current_round - self._rounds <= max_staleness)))

    def sample(
        self,
        batch_size: int,
        current_round: int,
        max_staleness: int,
        rng: np.random.Generator,
        *,
        freshness_decay: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A training batch ``(acts float32 (k, *shape), labels, rounds)``, or None if empty.

        Draws without replacement among entries with ``current_round - round <=
        max_staleness``; ``k = min(batch_size, fresh entries)``. With ``freshness_decay`` d in
        (0, 1], an entry s rounds stale is drawn with weight d**s. When fewer than
        ``batch_size`` fresh entries remain and a spill tier is attached, refills first.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if freshness_decay is not None and not 0.0 < freshness_decay <= 1.0:
            raise ConfigError(f"freshness_decay must be in (0, 1], got {freshness_decay}")
        eligible = np.flatnonzero(self._valid & (current_round - self._rounds <= max_staleness))
        short = eligible.size < batch_size and self.spill is not None and self.spill.blocks
        if short and self.refill(current_round, max_staleness):
            fresh = self._valid & (current_round - self._rounds <= max_staleness)
            eligible = np.flatnonzero(fresh)
        if eligible.size == 0:
            return None
        k = min(batch_size, int(eligible.size))
        probs = None
        if freshness_decay is not None and freshness_decay < 1.0:
            staleness = np.maximum(current_round - self._rounds[eligible], 0).astype(np.float64)
            weights = freshness_decay**staleness
            probs = weights / weights.sum()
        chosen = rng.choice(eligible, size=k, replace=False, p=probs)
        self.stats.sampled_batches += 1
        self.stats.sampled_entries += k
        acts = self._acts[chosen].astype(np.float32).reshape(k, *self.activation_shape)
        return acts, self._labels[chosen].copy(), self._rounds[chosen].copy()

    def label_counts(self, num_classes: int) -> np.ndarray:
        """int64 (num_classes,): labels of the entries held."""
        return np.bincount(self._labels[self._valid], minlength=num_classes).astype(np.int64)

    def occupancy(self, current_round: int | None = None) -> Occupancy:
        """Entries, bytes, capacity, per-device counts and (given a round) mean staleness."""
        by_device: dict[str, int] = {}
        for device, _ in self._slot:
            by_device[device] = by_device.get(device, 0) + 1
        row_bytes = self._acts.itemsize * self.dim
        out: Occupancy = {
            "entries": len(self._slot),
            "capacity": self.capacity,
            "bytes": len(self._slot) * row_bytes,
            "capacity_bytes": self.capacity * row_bytes,
            "by_device": dict(sorted(by_device.items())),
        }
        if current_round is not None:
            held = self._rounds[self._valid]
            out["mean_staleness"] = float(np.mean(current_round - held)) if held.size else 0.0
        return out
