"""How a training pool is dealt to devices: IID, Dirichlet label skew, FedAvg's label shards,
and skewed per-device sample counts on top of any of them.

Pure numpy, deterministic for a seed. Every scheme returns one sorted index array per device,
and the arrays are a partition of ``range(len(labels))``: no sample lost, none duplicated
(except :func:`subsample_parts` and :func:`resize_parts` with a smaller total, which keep a
subset on purpose).

Internally a partition is an *owner* array (the device of every sample): moving a sample is
one assignment, which keeps rebalancing a 10,000-device fleet vectorised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from emo_mqtt.errors import ConfigError
from emo_mqtt.seeds import derive_seed

__all__ = [
    "SIZE_SKEWS",
    "SizeSkew",
    "draw_sizes",
    "label_histogram",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "rebalance",
    "resize_parts",
    "subsample_parts",
]

SizeSkew = Literal["none", "lognormal", "powerlaw"]
SIZE_SKEWS: tuple[str, ...] = ("none", "lognormal", "powerlaw")


def _check_fleet(n: int, n_devices: int, min_size: int) -> None:
    if n_devices < 1:
        raise ConfigError(f"n_devices must be >= 1, got {n_devices}")
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    if min_size * n_devices > n:
        raise ConfigError(
            f"cannot give {n_devices} devices {min_size} samples each from {n} training samples "
            f"(needs {n_devices * min_size})"
        )


def _parts_of(owner: np.ndarray, n_devices: int) -> list[np.ndarray]:
    """Sorted index arrays per device from an owner array."""
    # A stable sort by owner keeps indices ascending within each device.
    order = np.argsort(owner, kind="stable")
    bounds = np.cumsum(np.bincount(owner, minlength=n_devices))[:-1]
    return list(np.split(order.astype(np.int64), bounds))


def _owner_of(parts: Sequence[np.ndarray], n: int) -> np.ndarray:
    owner = np.full(n, -1, dtype=np.int64)
    for dev, part in enumerate(parts):
        owner[np.asarray(part, dtype=np.int64)] = dev
    if (owner < 0).any() or sum(int(np.asarray(p).size) for p in parts) != n:
        raise ConfigError("parts are not a partition of the pool")
    return owner


def partition_iid(labels: np.ndarray, n_devices: int, seed: int) -> list[np.ndarray]:
    """Split sample indices uniformly at random into ``n_devices`` parts of near-equal size."""
    n = int(np.asarray(labels).shape[0])
    if n_devices < 1 or n_devices > n:
        raise ConfigError(f"n_devices must be in 1..{n}, got {n_devices}")
    rng = np.random.default_rng(derive_seed(seed, "partition-iid"))
    perm = rng.permutation(n)
    return [np.sort(part) for part in np.array_split(perm, n_devices)]


def partition_dirichlet(
    labels: np.ndarray,
    n_devices: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Non-IID label-skewed partition: per class, Dirichlet(alpha) shares over devices.

    The standard scheme (Yurochkin et al. 2019, Hsu et al. 2019): for each class the indices are
    shuffled and cut by proportions drawn from Dir(alpha); a device that already holds more
    than N / n_devices samples gets no more (keeps sizes bounded). Small alpha means strong
    skew. Deterministic for a given ``seed``.

    Devices left with fewer than ``min_size`` samples are topped up by :func:`rebalance`
    (samples move from the largest parts), so any fleet with ``n_devices * min_size <= N``
    gets a partition in one draw. Where that draw already meets the minimum, which every
    shipped scenario's does, the result is exactly the first draw of the earlier
    retry-until-it-fits version: their partitions, and so their results, are unchanged.
    """
    y = np.asarray(labels)
    n = int(y.shape[0])
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    _check_fleet(n, n_devices, min_size)
    rng = np.random.default_rng(derive_seed(seed, "partition-dirichlet", alpha))
    owner = np.empty(n, dtype=np.int64)
    sizes = np.zeros(n_devices, dtype=np.int64)
    devices = np.arange(n_devices)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_devices, alpha))
        shares = shares * (sizes < n / n_devices)
        total = shares.sum()
        shares = shares / total if total > 0 else np.full(n_devices, 1.0 / n_devices)
        cuts = (np.cumsum(shares) * idx.size).astype(np.int64)[:-1]
        # The chunk lengths np.split(idx, cuts) would give (slices clip to the array).
        edges = np.clip(np.concatenate(([0], cuts, [idx.size])), 0, idx.size)
        chunk = np.diff(edges)
        owner[idx] = np.repeat(devices, chunk)
        sizes += chunk
    if sizes.min() < min_size:
        owner = rebalance(y, owner, np.full(n_devices, min_size), rng)
    return _parts_of(owner, n_devices)


def _water_level(counts: np.ndarray, floor: np.ndarray, deficit: int) -> np.ndarray:
    """How many samples each device gives: the largest parts first, down to a common level.

    ``give_i = max(0, counts_i - max(L, floor_i))`` with the highest integer level ``L`` that
    frees at least ``deficit`` samples; the few extra freed at that level are kept back by
    the largest of the devices at it.
    """

    def freed(level: int) -> int:
        return int(np.maximum(counts - np.maximum(level, floor), 0).sum())

    lo, hi = 0, int(counts.max())  # freed(lo) >= deficit (checked by the caller), freed(hi) = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if freed(mid) >= deficit:
            lo = mid
        else:
            hi = mid
    give = np.maximum(counts - np.maximum(lo, floor), 0)
    extra = int(give.sum()) - deficit
    if extra > 0:
        # Devices that would give one fewer at level lo + 1; extra < their number.
        at_level = np.flatnonzero((counts > lo) & (floor <= lo))
        at_level = at_level[np.argsort(-counts[at_level], kind="stable")]
        give[at_level[:extra]] -= 1
    return np.asarray(give, dtype=np.int64)


def rebalance(
    labels: np.ndarray, owner: np.ndarray, minimum: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Move samples so that device ``i`` holds at least ``minimum[i]`` (a new owner array).

    Donors are the largest parts, cut down towards a common level (never below their own
    minimum), each giving up a uniform random subset of its samples, which keeps its label
    mix. The freed samples are sorted by label and dealt in contiguous runs to the deficient
    devices, ordered by the label each already holds most of: a receiver mostly gets more of
    its own dominant label, usually one or two labels in all, so the label skew survives.
    """
    y = np.asarray(labels, dtype=np.int64)
    owner = np.array(owner, dtype=np.int64, copy=True)
    n_devices = int(minimum.size)
    counts = np.bincount(owner, minlength=n_devices)
    need = np.maximum(minimum - counts, 0)
    deficit = int(need.sum())
    if deficit == 0:
        return owner
    if int(minimum.sum()) > owner.size:
        raise ConfigError(f"cannot give devices {int(minimum.sum())} samples from {owner.size}")
    give = _water_level(counts, minimum, deficit)
    # A random order within each device, then the first give[d] samples of device d.
    order = np.lexsort((rng.random(owner.size), owner))
    grouped = owner[order]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(owner.size) - starts[grouped]
    freed = order[rank < give[grouped]]
    freed = freed[np.lexsort((rng.random(freed.size), y[freed]))]
    receivers = np.flatnonzero(need > 0)
    n_labels = int(y.max()) + 1 if y.size else 1
    hist = np.bincount(owner * n_labels + y, minlength=n_devices * n_labels)
    hist = hist.reshape(n_devices, n_labels)[receivers]
    # An empty device has no label of its own yet: it takes a random one.
    dominant = np.where(
        hist.sum(axis=1) > 0, hist.argmax(axis=1), rng.integers(0, n_labels, size=receivers.size)
    )
    receivers = receivers[np.lexsort((rng.random(receivers.size), dominant))]
    owner[freed] = np.repeat(receivers, need[receivers])
    return owner


def partition_shards(
    labels: np.ndarray, n_devices: int, shards_per_device: int, seed: int, min_size: int = 0
) -> list[np.ndarray]:
    """The pathological non-IID partition of FedAvg's paper (McMahan et al. 2017).

    Samples are sorted by label (in random order within a label), cut into
    ``n_devices * shards_per_device`` contiguous shards of near-equal size, and every device
    gets ``shards_per_device`` of them at random. A shard spans one label, or two where it
    straddles a label boundary, so a device holds about ``shards_per_device`` labels.
    """
    y = np.asarray(labels)
    n = int(y.shape[0])
    if shards_per_device < 1:
        raise ConfigError(f"shards_per_device must be >= 1, got {shards_per_device}")
    _check_fleet(n, n_devices, min_size)
    n_shards = n_devices * shards_per_device
    if n_shards > n:
        raise ConfigError(
            f"{n_devices} devices x {shards_per_device} shards = {n_shards} shards is more "
            f"than the {n} training samples"
        )
    smallest = shards_per_device * (n // n_shards)
    if smallest < min_size:
        raise ConfigError(
            f"{shards_per_device} shards of {n // n_shards} samples give a device {smallest} "
            f"samples, fewer than the minimum {min_size}"
        )
    rng = np.random.default_rng(derive_seed(seed, "partition-shards", shards_per_device))
    # A random order sorted stably by label: labels contiguous, random within each label.
    shuffled = rng.permutation(n)
    sorted_idx = shuffled[np.argsort(y[shuffled], kind="stable")]
    # Shard s holds sorted_idx[bounds[s]:bounds[s + 1]] (np.array_split's sizes); device d
    # gets the shards in row d of a random permutation.
    dealt = rng.permutation(n_shards).reshape(n_devices, shards_per_device)
    shard_owner = np.empty(n_shards, dtype=np.int64)
    shard_owner[dealt.ravel()] = np.repeat(np.arange(n_devices), shards_per_device)
    shard_sizes = np.full(n_shards, n // n_shards)
    shard_sizes[: n % n_shards] += 1
    owner = np.empty(n, dtype=np.int64)
    owner[sorted_idx] = np.repeat(shard_owner, shard_sizes)
    return _parts_of(owner, n_devices)


def draw_sizes(
    n_devices: int,
    total: int,
    kind: SizeSkew,
    spread: float,
    seed: int,
    min_size: int = 0,
) -> np.ndarray:
    """Per-device sample counts: int64 (n_devices,), summing to ``total``, each >= ``min_size``.

    The ``total - n_devices * min_size`` samples above the minimum are shared in proportion
    to one weight per device: ``lognormal``, ``exp(N(0, spread^2))`` (``spread`` is sigma; the
    weights' coefficient of variation is ``sqrt(exp(sigma^2) - 1)``); ``powerlaw``, Pareto
    with shape ``spread`` and scale 1 (tail ``P(w > x) = x^-spread``: a few devices hold much
    of the data, as in FedScale's client traces); ``none``, equal weights. Rounding goes to
    the largest remainders, so the total is exact.
    """
    if n_devices < 1:
        raise ConfigError(f"n_devices must be >= 1, got {n_devices}")
    spare = total - n_devices * min_size
    if spare < 0:
        raise ConfigError(f"cannot give {n_devices} devices {min_size} samples each from {total}")
    if kind != "none" and not spread > 0:
        raise ConfigError(f"size skew {kind!r} needs a spread > 0, got {spread}")
    rng = np.random.default_rng(derive_seed(seed, "size-skew", kind, spread))
    if kind == "lognormal":
        weights = rng.lognormal(0.0, spread, size=n_devices)
    elif kind == "powerlaw":
        weights = rng.pareto(spread, size=n_devices) + 1.0
    elif kind == "none":
        weights = np.ones(n_devices)
    else:
        raise ConfigError(f"unknown size skew {kind!r}; known: {', '.join(SIZE_SKEWS)}")
    raw = weights / weights.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    short = spare - int(sizes.sum())
    sizes[np.argsort(-(raw - sizes), kind="stable")[:short]] += 1
    return np.asarray(sizes + min_size, dtype=np.int64)


def resize_parts(
    labels: np.ndarray, parts: Sequence[np.ndarray], sizes: np.ndarray, seed: int
) -> list[np.ndarray]:
    """Give device ``i`` exactly ``sizes[i]`` samples, keeping each part's label skew.

    ``parts`` must partition the pool and ``sizes`` sum to at most its size. Devices short of
    their size are topped up by :func:`rebalance` from the largest parts; every device then
    keeps a uniform random subset of its part of the right size. With ``sum(sizes)`` equal to
    the pool, nothing is dropped.
    """
    y = np.asarray(labels)
    target = np.asarray(sizes, dtype=np.int64)
    if target.size != len(parts):
        raise ConfigError(f"{target.size} sizes for {len(parts)} parts")
    if int(target.sum()) > y.size or (target < 0).any():
        raise ConfigError(f"sizes sum to {int(target.sum())}; the pool holds {y.size}")
    rng = np.random.default_rng(derive_seed(seed, "resize"))
    owner = rebalance(y, _owner_of(parts, y.size), target, rng)
    # Keep the first target[d] samples of device d in a random order (vectorised: one
    # rng.choice per device costs seconds at 10,000 devices).
    order = np.lexsort((rng.random(owner.size), owner))
    grouped = owner[order]
    starts = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=target.size))[:-1]))
    kept = order[np.arange(owner.size) - starts[grouped] < target[grouped]]
    trimmed = np.full(owner.size, target.size, dtype=np.int64)  # target.size: dropped
    trimmed[kept] = owner[kept]
    return _parts_of(trimmed, target.size + 1)[:-1]


def subsample_parts(
    parts: Sequence[np.ndarray], max_per_device: int, seed: int
) -> list[np.ndarray]:
    """Cap every part at ``max_per_device`` samples (uniform draw, keeps each device's skew).

    Lets a small fleet use a slice of the data per device while keeping the label skew that the
    partition over the full training set produced.
    """
    if max_per_device < 1:
        raise ConfigError(f"max_per_device must be >= 1, got {max_per_device}")
    out = []
    for dev, part in enumerate(parts):
        if part.size <= max_per_device:
            out.append(np.sort(part))
            continue
        rng = np.random.default_rng(derive_seed(seed, "subsample", dev))
        out.append(np.sort(rng.choice(part, size=max_per_device, replace=False)))
    return out


def label_histogram(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int = 10
) -> np.ndarray:
    """int64 (n_parts, num_classes): how many samples of each class every part holds."""
    y = np.asarray(labels)
    return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts]).astype(np.int64)
