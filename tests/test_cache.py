"""The activation replay cache: device outbox, overlay replay buffer, disk spill tier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_mqtt.cache import (
    ActivationBatch,
    DeviceOutbox,
    PutResult,
    ReplayCache,
    SpillBlock,
    SpillTier,
)
from emo_mqtt.errors import ConfigError

SHAPE = (2, 2, 2)  # 8 floats per entry


def acts(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, *SHAPE), value, dtype=np.float32)


def put(cache: ReplayCache, dev: str, ids: list[int], rnd: int, value: float = 1.0) -> PutResult:
    return cache.put(dev, ids, acts(len(ids), value), [i % 10 for i in ids], rnd)


# ------------------------------------------------------------------------- ActivationBatch


@pytest.mark.parametrize(("precision", "tol"), [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1e-2)])
def test_quantize_round_trip(precision: str, tol: float) -> None:
    a = np.abs(np.random.default_rng(0).normal(size=(5, *SHAPE))).astype(np.float32)
    b = ActivationBatch.quantize(3, np.arange(5), a, np.arange(5), precision)  # type: ignore[arg-type]
    assert b.precision == precision and len(b) == 5 and b.round == 3
    err = np.abs(b.activations() - a).max() / np.abs(a).max()
    assert err <= tol
    zeros = ActivationBatch.quantize(0, [0], np.zeros((1, *SHAPE)), [0], precision)  # type: ignore[arg-type]
    assert np.array_equal(zeros.activations(), np.zeros((1, *SHAPE)))


def test_quantized_sizes_shrink() -> None:
    a = np.ones((32, 16, 4, 4), np.float32)
    sizes = [
        ActivationBatch.quantize(0, np.arange(32), a, np.zeros(32), p).nbytes
        for p in ("fp32", "fp16", "int8")
    ]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[0] == 32 * 256 * 4 + 2 * 32 * 8
    with pytest.raises(ConfigError):
        ActivationBatch.quantize(0, np.arange(3), a, np.zeros(32), "fp32")


# ----------------------------------------------------------------------------- DeviceOutbox


class Blob:
    def __init__(self, name: str, nbytes: int) -> None:
        self.name, self.nbytes = name, nbytes


def test_outbox_fifo_and_eviction() -> None:
    box: DeviceOutbox[Blob] = DeviceOutbox(max_bytes=100)
    assert box.push(Blob("a", 40)) == 0 and box.push(Blob("b", 40)) == 0
    assert box.push(Blob("c", 40)) == 1  # evicts a, the oldest
    assert box.stats.evicted == 1 and box.stats.evicted_bytes == 40
    assert box.bytes == 80 and len(box) == 2
    assert box.push(Blob("huge", 101)) == 0 and box.stats.dropped == 1
    first = box.pop()
    assert first is not None and first.name == "b"
    assert [b.name for b in box.pop_all()] == ["c"]
    assert box.pop() is None and box.bytes == 0 and box.stats.popped == 2
    with pytest.raises(ConfigError):
        DeviceOutbox(0)


# ------------------------------------------------------------------------------ ReplayCache


def test_keying_and_replacement() -> None:
    c = ReplayCache(10, SHAPE)
    r = put(c, "d1", [0, 1, 2], rnd=1)
    assert (r.inserted, r.replaced, r.evicted) == (3, 0, 0)
    r = put(c, "d2", [0, 1], rnd=1)  # same sample ids, another device: other keys
    assert r.inserted == 2 and len(c) == 5
    r = put(c, "d1", [1], rnd=2, value=5.0)  # newer version replaces
    assert (r.inserted, r.replaced) == (0, 1) and c.round_of("d1", 1) == 2
    r = put(c, "d1", [1], rnd=0, value=9.0)  # an older version never overwrites a newer one
    assert r.skipped == 1 and c.round_of("d1", 1) == 2
    got = c.sample(10, current_round=2, max_staleness=0, rng=np.random.default_rng(0))
    assert got is not None and got[0].shape == (1, *SHAPE) and np.all(got[0] == 5.0)
    r = c.put("d3", [7, 7], np.stack([acts(1, 1.0)[0], acts(1, 2.0)[0]]), [1, 2], 3)
    assert r.inserted == 1 and r.skipped == 1  # within a batch the last occurrence wins
    got = c.sample(10, current_round=3, max_staleness=0, rng=np.random.default_rng(0))
    assert got is not None and got[1].tolist() == [2]
    assert ("d3", 7) in c and ("d3", 8) not in c


def test_eviction_stalest_round_then_oldest_insertion(tmp_path: Path) -> None:
    c = ReplayCache(4, SHAPE)
    put(c, "a", [0], rnd=5)
    put(c, "a", [1], rnd=3)
    put(c, "a", [2], rnd=3)
    put(c, "a", [3], rnd=4)
    r = put(c, "b", [0], rnd=6)
    assert r.evicted == 1 and ("a", 1) not in c  # round 3, inserted before ("a", 2)
    put(c, "b", [1], rnd=6)
    assert ("a", 2) not in c and ("a", 3) in c
    put(c, "b", [2, 3], rnd=6)
    assert sorted(c.occupancy()["by_device"].items()) == [("b", 4)]
    # A late batch staler than everything held is not inserted (counted as evicted).
    r = put(c, "late", [0], rnd=1)
    assert (r.inserted, r.evicted) == (0, 1) and len(c) == 4 and c.stats.evicted == 5


def test_sampling_respects_staleness_and_weights() -> None:
    c = ReplayCache(100, SHAPE)
    put(c, "a", list(range(10)), rnd=1, value=1.0)
    put(c, "b", list(range(10)), rnd=5, value=5.0)
    rng = np.random.default_rng(0)
    got = c.sample(64, current_round=6, max_staleness=2, rng=rng)
    assert got is not None and got[0].shape[0] == 10 and set(got[2].tolist()) == {5}
    assert got[0].dtype == np.float32
    assert c.sample(8, current_round=20, max_staleness=2, rng=rng) is None
    counts = {1: 0, 5: 0}
    for _ in range(200):
        s = c.sample(2, 6, 10, rng, freshness_decay=0.3)
        assert s is not None
        for rd in s[2]:
            counts[int(rd)] += 1
    assert counts[5] > 3 * counts[1]  # fresher entries drawn far more often
    with pytest.raises(ConfigError):
        c.sample(0, 6, 1, rng)
    with pytest.raises(ConfigError):
        c.sample(4, 6, 1, rng, freshness_decay=1.5)


def test_purge_and_occupancy() -> None:
    c = ReplayCache(50, SHAPE, dtype="float32")
    put(c, "a", [0, 1, 2], rnd=1)
    put(c, "b", [0], rnd=4)
    occ = c.occupancy(current_round=4)
    assert occ["entries"] == 4 and occ["capacity"] == 50
    assert occ["bytes"] == 4 * 8 * 4 and occ["by_device"] == {"a": 3, "b": 1}
    assert occ["mean_staleness"] == pytest.approx((3 * 3 + 0) / 4)
    assert c.fresh_count(4, 1) == 1
    assert c.purge_stale(current_round=4, max_staleness=1) == 3
    assert len(c) == 1 and c.stats.purged == 3
    assert c.label_counts(10).sum() == 1


def test_put_validation() -> None:
    c = ReplayCache(5, SHAPE)
    with pytest.raises(ConfigError):
        c.put("a", [0, 1], acts(3), [0, 1], 0)
    with pytest.raises(ConfigError):
        c.put("a", [0], np.zeros((1, 7), np.float32), [0], 0)
    with pytest.raises(ConfigError):
        c.put("a", [0], np.full((1, *SHAPE), np.nan, np.float32), [0], 0)
    with pytest.raises(ConfigError):
        c.put("a", [0], np.zeros((1, *SHAPE), np.int8), [0], 0)
    c.put("a", [0], np.zeros((1, 8), np.float32), [0], 0)  # flat rows are accepted
    with pytest.raises(ConfigError):
        ReplayCache(0, SHAPE)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.integers(0, 12), min_size=1, max_size=6),
            st.integers(0, 8),
        ),
        max_size=25,
    )
)
def test_invariants_under_random_puts(ops: list[tuple[str, list[int], int]]) -> None:
    cap = 7
    c = ReplayCache(cap, SHAPE)
    newest: dict[tuple[str, int], int] = {}
    for dev, ids, rnd in ops:
        put(c, dev, ids, rnd)
        for i in ids:
            newest[(dev, i)] = max(newest.get((dev, i), -1), rnd)
        assert len(c) <= cap
        held = c.occupancy()["by_device"]
        assert sum(held.values()) == len(c)
    # whatever is held is the newest version offered for that key... unless it was evicted
    for key, rnd in newest.items():
        got = c.round_of(*key)
        assert got is None or got == rnd
    s = c.stats
    assert len(c) == s.inserted - (s.evicted - s.dropped) - s.purged
    assert s.offered == s.inserted + s.replaced + s.skipped + s.dropped


# ------------------------------------------------------------------------------- SpillTier


def block(dev: str, ids: list[int], rnd: int) -> SpillBlock:
    n = len(ids)
    return SpillBlock(
        np.full(n, dev),
        np.asarray(ids, np.int64),
        np.full((n, 8), float(rnd), np.float16),
        np.asarray(ids, np.int64) % 10,
        np.full(n, rnd, np.int64),
    )


def test_spill_bounded_drops_oldest(tmp_path: Path) -> None:
    one = SpillTier(tmp_path / "probe", max_bytes=1 << 20).write(block("a", list(range(10)), 0))
    spill = SpillTier(tmp_path / "s", max_bytes=int(2.5 * one))
    for r in range(4):
        spill.write(block("a", list(range(10)), r))
    assert spill.blocks == 2 and spill.bytes <= spill.max_bytes
    assert spill.stats.blocks_dropped == 2 and spill.stats.entries_dropped == 20
    got = spill.take(current_round=3, max_staleness=5, limit=100)
    assert got is not None and sorted(set(got.rounds.tolist())) == [2, 3]
    assert spill.blocks == 0 and spill.bytes == 0


def test_spill_take_partial_stale_and_adopt(tmp_path: Path) -> None:
    spill = SpillTier(tmp_path, max_bytes=1 << 20)
    spill.write(block("a", [0, 1, 2], 1))
    spill.write(block("b", [0, 1, 2, 3], 5))
    got = spill.take(current_round=6, max_staleness=2, limit=3)
    assert got is not None and len(got) == 3 and set(got.device_ids.tolist()) == {"b"}
    assert spill.blocks == 2  # one b entry left, and the untouched a block
    reopened = SpillTier(tmp_path, max_bytes=1 << 20)  # adopts blocks on disk
    assert reopened.blocks == 2
    got = reopened.take(current_round=6, max_staleness=2, limit=10)
    assert got is not None and got.device_ids.tolist() == ["b"]
    assert reopened.stats.stale_discarded == 3 and reopened.blocks == 0
    assert reopened.take(6, 2, 10) is None


def test_spill_files_load_without_pickle_and_survive_corruption(tmp_path: Path) -> None:
    spill = SpillTier(tmp_path, max_bytes=1 << 20)
    spill.write(block("dev-ü", [4, 5], 2))
    (path,) = tmp_path.glob("block-*.npz")
    with np.load(path, allow_pickle=False) as npz:
        assert npz["device_ids"].tolist() == ["dev-ü", "dev-ü"]
    path.write_bytes(b"garbage")
    assert spill.take(2, 1, 10) is None and spill.stats.corrupt_blocks == 1
    assert not path.exists()


def test_cache_spills_evictions_and_refills(tmp_path: Path) -> None:
    spill = SpillTier(tmp_path, max_bytes=1 << 20)
    c = ReplayCache(4, SHAPE, spill=spill)
    put(c, "a", [0, 1, 2, 3], rnd=1)
    put(c, "b", [0, 1, 2, 3], rnd=2)  # evicts the four round-1 entries into the spill
    assert c.stats.evicted == 4 and c.stats.spilled == 4 and spill.stats.entries_written == 4
    put(c, "c", [0, 1], rnd=0)  # staler than everything: straight to the spill
    assert spill.stats.entries_written == 6 and len(c) == 4
    got = c.sample(4, current_round=3, max_staleness=1, rng=np.random.default_rng(0))
    assert got is not None and set(got[2].tolist()) == {2}
    # Too few fresh entries but no free or stale slot: nothing can be refilled.
    got = c.sample(8, current_round=2, max_staleness=1, rng=np.random.default_rng(0))
    assert got is not None and got[0].shape[0] == 4 and c.stats.refilled == 0
    # The memory tier runs dry: sampling refills it with the spill's fresh entries (round 1),
    # discarding the spill's stale ones (round 0) on the way.
    c.purge_stale(current_round=3, max_staleness=0)
    got = c.sample(8, current_round=3, max_staleness=2, rng=np.random.default_rng(0))
    assert got is not None and sorted(set(got[2].tolist())) == [1]
    assert c.stats.refilled == 4 and ("a", 0) in c and spill.stats.stale_discarded == 2
    assert spill.blocks == 0


def test_snapshot_holds_every_entry_oldest_first() -> None:
    cache = ReplayCache(10, (2,), dtype="float32")
    cache.put("a", [1, 2], np.ones((2, 2), np.float32), [0, 1], round=1)
    cache.put("b", [7], np.full((1, 2), 2.0, np.float32), [3], round=2)
    cache.put("a", [1], np.full((1, 2), 3.0, np.float32), [0], round=3)  # replaces a/1
    block = cache.snapshot()
    assert len(block) == len(cache) == 3
    keys = list(zip(block.device_ids.tolist(), block.sample_ids.tolist(), strict=True))
    assert keys == [("a", 2), ("b", 7), ("a", 1)]
    assert block.rounds.tolist() == [1, 2, 3]
