"""Device partitions for big fleets: Dirichlet rebalanced to a minimum, FedAvg's label shards,
skewed per-device sizes; their statistics, and the shipped scenarios' partitions pinned."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np
import pytest

from emo_mqtt.config import load_config
from emo_mqtt.data import load_fashion_mnist
from emo_mqtt.dataplan import device_indices
from emo_mqtt.errors import ConfigError
from emo_mqtt.partition import (
    draw_sizes,
    label_histogram,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    rebalance,
    resize_parts,
)
from emo_mqtt.seeds import derive_seed

ROOT = Path(__file__).resolve().parents[1]

# sha256 of every device's training indices, computed with the retry-until-it-fits
# partitioner (commit 2169867) before rebalancing replaced the retries. The quick start's
# and the paper's FL model hashes and docs/results.md depend on these partitions.
PINNED = [
    # ablation, scaling and spill share the quick start's data section: the same partition.
    ("ablation.toml", 1, "e23d05b392f9b71db7fc216ea8cd77810120145591535922daa5511f81cbd447"),
    ("scaling.toml", 1, "e23d05b392f9b71db7fc216ea8cd77810120145591535922daa5511f81cbd447"),
    ("spill.toml", 1, "e23d05b392f9b71db7fc216ea8cd77810120145591535922daa5511f81cbd447"),
    ("cellular.toml", 3, "392f79c7683aeb834144234f82828ae0554826fb20d5afd04d46da70fda4770c"),
    ("duty_cycle.toml", 5, "f6d267ea107f02e879847e61248b92463324a172e629c6a277770e423841c322"),
    ("fedscale.toml", 4, "6273b65d5ea23fef92e2b61fe81fc3088b7c94a66721edc218c8683a55aceba0"),
    ("fleet1000.toml", 1, "d37d096606564e34a49e749e7542375bde5807cdca59ac071d5af84e0eb6266c"),
    ("paper.toml", 1, "0778ead8aad1bb7f6f7f97fabe0355ac00291afc3b897d45bdcd751cf4269511"),
    ("paper.toml", 2, "916cce8208e6532b7ce94c4258f15183e57814f783a72967c8bf1f6e7551b2d6"),
    ("paper.toml", 3, "e3ffd5009cfdfe3f3c370d5683ff86554abebdd819cf0c96bf5766a3f4840bee"),
    ("quickstart.toml", 1, "e23d05b392f9b71db7fc216ea8cd77810120145591535922daa5511f81cbd447"),
    ("quickstart.toml", 2, "c44b913a1407aa4fa192263d257d765e876c20c5a98394f1731d29ad2543b854"),
    ("quickstart.toml", 3, "751ee723ddb4ed2244bf6c425ec87a5c191bee83bbecbca2b3b00edfa48145c9"),
    ("wan_outage.toml", 9, "f93e1867d1b4cba80c467e4aae2a9cc936d14cd143277101385947bd3f54d3f1"),
]


@pytest.mark.parametrize(("name", "seed", "digest"), PINNED)
def test_shipped_scenarios_keep_their_partitions(name: str, seed: int, digest: str) -> None:
    config = load_config(ROOT / "scenarios" / name).with_overrides(run={"seed": seed})
    train, _ = load_fashion_mnist(config.data.data_dir or None)
    _, shares = device_indices(config, train.y)
    h = hashlib.sha256()
    for device, idx in shares.items():
        h.update(device.encode())
        h.update(np.asarray(idx, dtype="<i8").tobytes())
    assert h.hexdigest() == digest


def test_every_shipped_fashion_scenario_is_pinned() -> None:
    shipped = {
        p.name
        for p in (ROOT / "scenarios").glob("*.toml")
        if load_config(p).data.dataset == "fashion-mnist"
    }
    assert shipped == {name for name, _, _ in PINNED}


def legacy_first_draw(y: np.ndarray, n_devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    """The first draw of the earlier partitioner, verbatim (chunks appended per class)."""
    n = y.size
    rng = np.random.default_rng(derive_seed(seed, "partition-dirichlet", alpha))
    parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
    sizes = np.zeros(n_devices, dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_devices, alpha))
        shares = shares * (sizes < n / n_devices)
        total = shares.sum()
        shares = shares / total if total > 0 else np.full(n_devices, 1.0 / n_devices)
        cuts = (np.cumsum(shares) * idx.size).astype(np.int64)[:-1]
        for dev, chunk in enumerate(np.split(idx, cuts)):
            parts[dev].append(chunk)
            sizes[dev] += chunk.size
    return [np.sort(np.concatenate(p)) for p in parts]


def pool_labels(n: int = 58_000, seed: int = 0) -> np.ndarray:
    """Balanced labels in random order: Fashion-MNIST's training pool, in shape."""
    return np.random.default_rng(seed).permutation(np.arange(n) % 10)


def assert_partition(parts: list[np.ndarray], n: int) -> None:
    """Every sample index of 0..n-1 in exactly one part."""
    every = np.concatenate(parts)
    assert every.size == n and np.array_equal(np.sort(every), np.arange(n))


def mean_entropy(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over devices of the entropy (bits) of the device's label distribution."""
    hist = label_histogram(y, parts).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    logs = np.log2(np.where(p > 0, p, 1.0))
    return float(-(p * logs).sum(axis=1).mean())


@pytest.mark.parametrize(
    ("n_devices", "alpha", "seed"), [(8, 0.3, 1), (8, 0.1, 2), (20, 0.5, 3), (50, 1.0, 4)]
)
def test_a_draw_that_meets_the_minimum_is_the_legacy_draw(
    n_devices: int, alpha: float, seed: int
) -> None:
    y = pool_labels(20_000, seed)
    legacy = legacy_first_draw(y, n_devices, alpha, seed)
    assert min(p.size for p in legacy) >= 10  # the case this pins: no rebalancing
    new = partition_dirichlet(y, n_devices, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(legacy, new, strict=True))


@pytest.mark.parametrize(("n_devices", "minimum"), [(1000, 10), (10_000, 5)])
def test_dirichlet_big_fleets_meet_the_minimum_fast(n_devices: int, minimum: int) -> None:
    y = pool_labels()
    legacy = legacy_first_draw(y, n_devices, 0.3, 1)
    assert min(p.size for p in legacy) < minimum  # the draw alone would have failed
    start = time.perf_counter()
    parts = partition_dirichlet(y, n_devices, 0.3, seed=1, min_size=minimum)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{n_devices} devices took {elapsed:.2f} s"
    assert_partition(parts, y.size)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= minimum
    again = partition_dirichlet(y, n_devices, 0.3, seed=1, min_size=minimum)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_dirichlet(y, n_devices, 0.3, seed=2, min_size=minimum)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skew_falls_as_alpha_rises_at_1000_devices() -> None:
    y = pool_labels()
    entropies = [
        mean_entropy(y, partition_dirichlet(y, 1000, a, seed=1)) for a in (0.05, 0.3, 1.0, 10.0)
    ]
    iid = mean_entropy(y, partition_iid(y, 1000, seed=1))
    assert entropies == sorted(entropies) and len(set(entropies)) == 4
    # Rebalancing keeps strong skew strong: at alpha 0.3 a device sees about half the
    # label entropy of an IID device of the same size.
    assert entropies[1] < 0.65 * iid
    assert entropies[-1] > 0.9 * iid

    # A KS-style check on the label mix of device sizes: the share of each device's
    # dominant label, whose distribution shifts down as alpha rises.
    def dominant_share(alpha: float) -> np.ndarray:
        hist = label_histogram(y, partition_dirichlet(y, 1000, alpha, seed=1)).astype(float)
        return np.sort(hist.max(axis=1) / hist.sum(axis=1))

    low, high = dominant_share(0.3), dominant_share(10.0)
    grid = np.linspace(0, 1, 101)
    cdf_low = np.searchsorted(low, grid, side="right") / low.size
    cdf_high = np.searchsorted(high, grid, side="right") / high.size
    assert np.max(cdf_high - cdf_low) > 0.5  # high alpha: dominant shares clearly smaller


def test_rebalance_moves_only_what_is_needed_and_keeps_receivers_skewed() -> None:
    y = pool_labels(10_000)
    rng = np.random.default_rng(5)
    owner = np.where(rng.random(y.size) < 0.5, 0, 1 + y % 3)  # device 0 large, 1-3 one label
    owner[:30] = 0
    minimum = np.array([10, 10, 10, 10, 2000, 2000])  # devices 4, 5 empty
    counts = np.bincount(owner, minlength=6)
    new = rebalance(y, owner, minimum, np.random.default_rng(0))
    moved = int((new != owner).sum())
    assert moved == int(np.maximum(minimum - counts, 0).sum())  # no sample moves twice
    after = np.bincount(new, minlength=6)
    assert (after >= minimum).all() and after.sum() == y.size
    # Freed samples (about 4,500, 10 labels) are dealt in label-sorted runs: each of the
    # two empty devices gets about half the labels, and the runs meet in one label at most.
    held = [set(np.unique(y[new == dev]).tolist()) for dev in (4, 5)]
    assert all(len(h) <= 6 for h in held) and len(held[0] & held[1]) <= 1, held
    # The largest part gave: device 0 was the largest by far.
    assert after[0] < counts[0] and (after[1:4] <= counts[1:4]).all()


def test_shards_give_each_device_k_shards() -> None:
    y = pool_labels(6000)  # 600 per label: 200 shards of 30, 20 shards per label
    parts = partition_shards(y, 100, 2, seed=1)
    assert_partition(parts, y.size)
    hist = label_histogram(y, parts)
    assert (hist.sum(axis=1) == 60).all()
    assert ((hist > 0).sum(axis=1) <= 2).all()
    assert (hist % 30 == 0).all()  # whole shards only: exactly 2 per device
    assert ((hist > 0).sum(axis=1) == 1).mean() < 0.3  # two distinct labels mostly
    again = partition_shards(y, 100, 2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize(("n_devices", "k"), [(1000, 2), (300, 3), (7, 5)])
def test_shards_label_bound_on_uneven_pools(n_devices: int, k: int) -> None:
    y = np.random.default_rng(3).integers(0, 10, size=58_000)  # unequal label counts
    parts = partition_shards(y, n_devices, k, seed=2, min_size=10)
    assert_partition(parts, y.size)
    sizes = np.array([p.size for p in parts])
    shard = y.size // (n_devices * k)
    assert sizes.min() >= k * shard and sizes.max() <= k * (shard + 1)
    labels_held = (label_histogram(y, parts) > 0).sum(axis=1)
    # A shard spans one label, or two where it straddles a boundary.
    assert labels_held.max() <= min(10, 2 * k)
    if shard >= 10 * 58:  # shards larger than a label hold every one they straddle
        return
    assert labels_held.mean() <= k + 1


def test_lognormal_sizes_follow_the_distribution() -> None:
    n, total, minimum, sigma = 2000, 58_000, 10, 1.0
    sizes = draw_sizes(n, total, "lognormal", sigma, seed=1, min_size=minimum)
    assert sizes.sum() == total and sizes.min() >= minimum and sizes.dtype == np.int64
    # Above the minimum the counts are the weights scaled: CV = sqrt(exp(s^2) - 1) there.
    above = sizes - minimum
    cv = above.std() / above.mean()
    expected = math.sqrt(math.exp(sigma**2) - 1)
    assert abs(cv - expected) / expected < 0.25, (cv, expected)
    # KS against the normal on the log scale (counts of 3 or more: rounding is small there).
    logs = np.log(above[above >= 3].astype(float))
    z = np.sort((logs - logs.mean()) / sigma)
    normal_cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    ks = np.max(np.abs(normal_cdf - np.arange(1, z.size + 1) / z.size))
    assert ks < 0.08, ks
    flat = draw_sizes(n, total, "lognormal", 0.1, seed=1, min_size=minimum)
    assert (flat - minimum).std() < 0.2 * above.std()


def test_powerlaw_sizes_have_the_tail_asked_for() -> None:
    n, total, exponent = 5000, 58_000 * 10, 1.5
    sizes = draw_sizes(n, total, "powerlaw", exponent, seed=2, min_size=5)
    assert sizes.sum() == total and sizes.min() >= 5
    # Hill's estimator of the tail index on the top 10 %: close to the Pareto shape.
    top = np.sort((sizes - 5).astype(float))[::-1][: n // 10 + 1]
    hill = (top.size - 1) / np.log(top[:-1] / top[-1]).sum()
    assert abs(hill - exponent) / exponent < 0.2, hill
    assert sizes.max() > 20 * np.median(sizes)  # a few devices hold much of the data


def test_resize_parts_conserves_and_keeps_skew() -> None:
    y = pool_labels()
    parts = partition_dirichlet(y, 1000, 0.3, seed=1)
    sizes = draw_sizes(1000, y.size, "lognormal", 1.0, seed=1, min_size=10)
    resized = resize_parts(y, parts, sizes, seed=1)
    assert_partition(resized, y.size)  # the whole pool: nothing dropped, nothing doubled
    assert np.array_equal([p.size for p in resized], sizes)
    assert mean_entropy(y, resized) < 0.75 * mean_entropy(y, partition_iid(y, 1000, seed=1))
    half = resize_parts(y, parts, sizes // 2, seed=1)
    assert np.array_equal([p.size for p in half], sizes // 2)
    every = np.concatenate(half)
    assert np.unique(every).size == every.size  # a subset: no sample twice
    start = time.perf_counter()
    big = partition_dirichlet(y, 10_000, 0.3, seed=1, min_size=5)
    resize_parts(y, big, draw_sizes(10_000, y.size, "powerlaw", 1.5, 1, 5), seed=1)
    assert time.perf_counter() - start < 3.0


def test_fleets_too_large_are_refused_with_the_numbers() -> None:
    y = pool_labels(1000)
    with pytest.raises(ConfigError, match=r"200 devices 10 samples each from 1000 .*needs 2000"):
        partition_dirichlet(y, 200, 0.3, seed=0)
    with pytest.raises(ConfigError, match=r"7 shards of 4 samples give a device 28 .*minimum 30"):
        partition_shards(y, 30, 7, seed=0, min_size=30)
    with pytest.raises(ConfigError, match="shards"):
        partition_shards(y, 600, 2, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        partition_dirichlet(y, 5, 0.0, seed=0)
    with pytest.raises(ConfigError, match="spread"):
        draw_sizes(10, 100, "lognormal", 0.0, seed=0)
    with pytest.raises(ConfigError, match="5 samples each from 40"):
        draw_sizes(10, 40, "powerlaw", 1.5, seed=0, min_size=5)
    with pytest.raises(ConfigError, match="sizes sum"):
        resize_parts(y, partition_iid(y, 4, 0), np.array([300, 300, 300, 300]), seed=0)
