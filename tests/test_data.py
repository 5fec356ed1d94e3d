"""Data loading (IDX parsing, directory discovery) and device partitions."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from emo_mqtt.data import (
    DEFAULT_DATA_DIR,
    Split,
    derive_seed,
    find_data_dir,
    label_histogram,
    load_fashion_mnist,
    partition_dirichlet,
    partition_iid,
    subsample_parts,
)
from emo_mqtt.errors import ConfigError

NAMES = {
    "train-images-idx3-ubyte": (3, 12),
    "train-labels-idx1-ubyte": (1, 12),
    "t10k-images-idx3-ubyte": (3, 5),
    "t10k-labels-idx1-ubyte": (1, 5),
}


def idx_bytes(ndim: int, n: int, *, magic: bytes | None = None) -> bytes:
    rng = np.random.default_rng(n)
    dims: tuple[int, ...]
    if ndim == 3:
        body = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8).tobytes()
        dims = (n, 28, 28)
    else:
        body = (np.arange(n) % 10).astype(np.uint8).tobytes()
        dims = (n,)
    head = magic if magic is not None else bytes([0, 0, 8, ndim])
    return head + b"".join(struct.pack(">I", d) for d in dims) + body


def write_fake(directory: Path, *, gz: bool, corrupt: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (ndim, n) in NAMES.items():
        data = idx_bytes(ndim, n)
        if corrupt == name:
            data = idx_bytes(ndim, n, magic=b"\x00\x00\x09\x03")
        elif corrupt == "truncate" and ndim == 3:
            data = data[:-7]
        path = directory / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
    return directory


@pytest.mark.parametrize("gz", [True, False])
def test_reads_fake_idx_gzipped_or_not(tmp_path: Path, gz: bool) -> None:
    write_fake(tmp_path, gz=gz)
    train, test = load_fashion_mnist(tmp_path)
    assert (len(train), len(test)) == (12, 5)
    assert train.x.shape == (12, 1, 28, 28) and train.x.dtype == np.float32
    assert train.y.dtype == np.int64 and list(test.y) == [0, 1, 2, 3, 4]
    assert not train.x.flags.writeable  # cached arrays are shared: frozen


def test_torchvision_layout_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_fake(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert find_data_dir(tmp_path) == raw
    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path))
    assert find_data_dir(None) == raw


def test_missing_dir_names_paths_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        find_data_dir(tmp_path / "nope")
    text = str(err.value)
    assert str(tmp_path / "nope") in text and "apt-get install dataset-fashion-mnist" in text
    assert "--data-dir" in text


@pytest.mark.parametrize("corrupt", ["t10k-labels-idx1-ubyte", "truncate"])
def test_corrupt_files_raise_config_error(tmp_path: Path, corrupt: str) -> None:
    write_fake(tmp_path, gz=True, corrupt=corrupt)
    with pytest.raises(ConfigError, match="corrupt"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_is_normalised_and_cached() -> None:
    import time

    train, test = load_fashion_mnist()
    assert (len(train), len(test)) == (60000, 10000)
    assert abs(float(train.x[:5000].mean())) < 0.05 and 0.9 < float(train.x[:5000].std()) < 1.1
    assert np.array_equal(np.bincount(test.y), np.full(10, 1000))
    start = time.perf_counter()
    again, _ = load_fashion_mnist()
    assert again is train and time.perf_counter() - start < 0.1


def test_split_subset_and_validation() -> None:
    s = Split(np.zeros((4, 1, 28, 28), np.float32), np.arange(4, dtype=np.int64))
    sub = s.subset([3, 1])
    assert len(sub) == 2 and list(sub.y) == [3, 1]
    with pytest.raises(ConfigError):
        Split(np.zeros((4, 1, 28, 28), np.float32), np.arange(3))


def labels(n: int = 5000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 10, size=n)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_partition_covers_and_is_deterministic() -> None:
    y = labels()
    parts = partition_iid(y, 7, seed=3)
    assert_exact_cover(parts, y.size)
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(y, 7, 3), strict=True))
    assert not np.array_equal(parts[0], partition_iid(y, 7, 4)[0])


def test_dirichlet_partition_covers_min_size_deterministic() -> None:
    y = labels()
    parts = partition_dirichlet(y, 8, alpha=0.3, seed=1, min_size=20)
    assert_exact_cover(parts, y.size)
    assert min(p.size for p in parts) >= 20
    again = partition_dirichlet(y, 8, alpha=0.3, seed=1, min_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of each part's label distribution from the global one."""
    hist = label_histogram(y, parts).astype(float)
    dist = hist / hist.sum(axis=1, keepdims=True)
    glob = np.bincount(y, minlength=10) / y.size
    return float(np.mean(0.5 * np.abs(dist - glob).sum(axis=1)))


def test_dirichlet_skew_decreases_with_alpha() -> None:
    y = labels(20000)
    skews = [
        np.mean([skew(y, partition_dirichlet(y, 10, a, seed=s)) for s in range(3)])
        for a in (0.1, 0.5, 5.0, 100.0)
    ]
    assert skews == sorted(skews, reverse=True)
    assert skews[0] > 0.5 and skews[-1] < 0.1


def test_partition_errors() -> None:
    y = labels(50)
    with pytest.raises(ConfigError):
        partition_dirichlet(y, 10, alpha=0.0, seed=0)
    with pytest.raises(ConfigError):
        partition_dirichlet(y, 10, alpha=0.5, seed=0, min_size=10)
    with pytest.raises(ConfigError):
        partition_iid(y, 0, seed=0)


def test_subsample_parts_and_histogram() -> None:
    y = labels()
    parts = subsample_parts(partition_dirichlet(y, 5, 0.5, seed=0), 300, seed=0)
    assert all(p.size <= 300 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, unique
    hist = label_histogram(y, parts)
    assert hist.shape == (5, 10) and hist.sum() == sum(p.size for p in parts)


def test_derive_seed_separates_streams() -> None:
    assert derive_seed(1, "train", "dev-1", 3) == derive_seed(1, "train", "dev-1", 3)
    assert derive_seed(1, "train", "dev-1", 3) != derive_seed(1, "activations", "dev-1", 3)
    assert derive_seed(1, "a", 12) != derive_seed(1, "a1", 2)
    assert 0 <= derive_seed(2**40, "x") < 2**63
