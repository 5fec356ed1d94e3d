"""The spill tier of the activation replay cache: overflow of an overlay's buffer, on disk.

A byte-bounded directory of ``.npz`` blocks that receives the overlay tier's capacity
evictions (:class:`emo_mqtt.cache.ReplayCache`) and refills it when too few fresh entries
remain. No pickle anywhere: blocks are written with ``np.savez`` and loaded with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo_mqtt.errors import ConfigError

__all__ = ["SpillBlock", "SpillStats", "SpillTier"]


@dataclass(frozen=True)
class SpillBlock:
    """Entries moved between tiers: parallel arrays, one row per entry."""

    device_ids: np.ndarray  # unicode (n,)
    sample_ids: np.ndarray  # int64 (n,)
    activations: np.ndarray  # (n, dim) float16/float32
    labels: np.ndarray  # int64 (n,)
    rounds: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def select(self, mask: np.ndarray) -> SpillBlock:
        return SpillBlock(
            self.device_ids[mask],
            self.sample_ids[mask],
            self.activations[mask],
            self.labels[mask],
            self.rounds[mask],
        )

    @classmethod
    def concatenate(cls, blocks: list[SpillBlock]) -> SpillBlock:
        """One block holding the rows of ``blocks`` in order."""
        return cls(*(np.concatenate([getattr(b, k) for b in blocks]) for k in _BLOCK_KEYS))


@dataclass
class SpillStats:
    """Counters of a :class:`SpillTier`."""

    blocks_written: int = 0
    entries_written: int = 0
    blocks_dropped: int = 0
    entries_dropped: int = 0
    entries_taken: int = 0
    stale_discarded: int = 0
    corrupt_blocks: int = 0


_BLOCK_RE = re.compile(r"^block-(\d{10})\.npz$")
_BLOCK_KEYS = ("device_ids", "sample_ids", "activations", "labels", "rounds")


class SpillTier:
    """A byte-bounded on-disk store of evicted cache entries (one ``.npz`` per block).

    Over ``max_bytes`` the oldest blocks are deleted (``stats.blocks_dropped``). Existing
    blocks in ``directory`` are adopted, so an overlay restart keeps its spill.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ConfigError(f"max_bytes must be >= 1, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.stats = SpillStats()
        self._blocks: dict[int, int] = {}  # seq -> bytes on disk
        for path in self.directory.iterdir():
            match = _BLOCK_RE.match(path.name)
            if match:
                self._blocks[int(match.group(1))] = path.stat().st_size
        self._next = max(self._blocks, default=-1) + 1
        self._enforce_bound()

    @property
    def bytes(self) -> int:
        """Bytes on disk."""
        return sum(self._blocks.values())

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def _path(self, seq: int) -> Path:
        return self.directory / f"block-{seq:010d}.npz"

    def _save(self, seq: int, block: SpillBlock) -> int:
        tmp = self.directory / f".tmp-{seq:010d}.npz"
        with tmp.open("wb") as fh:
            np.savez(fh, allow_pickle=False, **{k: getattr(block, k) for k in _BLOCK_KEYS})
        # Atomic: a crash mid-write never leaves a half block under a block name.
        os.replace(tmp, self._path(seq))
        size = self._path(seq).stat().st_size
        self._blocks[seq] = size
        return size

    def _delete(self, seq: int) -> None:
        self._blocks.pop(seq, None)
        self._path(seq).unlink(missing_ok=True)

    def _enforce_bound(self) -> None:
        for seq in sorted(self._blocks):
            if self.bytes <= self.max_bytes:
                break
            self.stats.blocks_dropped += 1
            self.stats.entries_dropped += self._count(seq)
            self._delete(seq)

    def _count(self, seq: int) -> int:
        block = self._load(seq)
        return 0 if block is None else len(block)

    def _load(self, seq: int) -> SpillBlock | None:
        try:
            with np.load(self._path(seq), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in _BLOCK_KEYS}
            block = SpillBlock(**arrays)
            n = len(block)
            if any(arrays[k].shape[0] != n for k in _BLOCK_KEYS) or block.activations.ndim != 2:
                raise ValueError("inconsistent block")
            return block
        except (OSError, ValueError, KeyError):
            self.stats.corrupt_blocks += 1
            self._delete(seq)
            return None

    def write(self, block: SpillBlock) -> int:
        """Store ``block`` as the newest block; returns its size in bytes (0 if empty)."""
        if len(block) == 0:
            return 0
        seq = self._next
        self._next += 1
        size = self._save(seq, block)
        self.stats.blocks_written += 1
        self.stats.entries_written += len(block)
        self._enforce_bound()
        return size

    def take(
        self, current_round: int, max_staleness: int, limit: int, *, oldest_first: bool = False
    ) -> SpillBlock | None:
        """Remove and return up to ``limit`` fresh entries, newest blocks first (oldest first
        with ``oldest_first``: a rotation through the tier, which writes back what it swaps out).

        Entries older than ``max_staleness`` rounds are deleted on the way (rounds only grow,
        so they can never become fresh again); untaken fresh entries stay on disk.
        """
        taken: list[SpillBlock] = []
        want = int(limit)
        for seq in sorted(self._blocks, reverse=not oldest_first):
            if want <= 0:
                break
            block = self._load(seq)
            if block is None:
                continue
            fresh = block.select(current_round - block.rounds <= max_staleness)
            self.stats.stale_discarded += len(block) - len(fresh)
            head = fresh.select(np.arange(len(fresh)) < want)
            rest = fresh.select(np.arange(len(fresh)) >= want)
            if len(head):
                taken.append(head)
                want -= len(head)
            if len(rest) == 0:
                self._delete(seq)
            elif len(rest) != len(block):
                self._save(seq, rest)
        if not taken:
            return None
        out = SpillBlock.concatenate(taken)
        self.stats.entries_taken += len(out)
        return out

    def clear(self) -> None:
        """Delete every block."""
        for seq in list(self._blocks):
            self._delete(seq)
