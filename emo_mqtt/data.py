"""Fashion-MNIST loading, device partitions and deterministic seed derivation.

Pure numpy and file reads: no torch, no network. The IDX files are those of the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), a directory given by the
user, or a torchvision download (``<dir>/FashionMNIST/raw``); gzipped or not.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo_mqtt.errors import ConfigError

__all__ = [
    "DEFAULT_DATA_DIR",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "NUM_CLASSES",
    "Split",
    "derive_seed",
    "find_data_dir",
    "label_histogram",
    "load_fashion_mnist",
    "partition_dirichlet",
    "partition_iid",
    "subsample_parts",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
NUM_CLASSES = 10
# Mean and std of the Fashion-MNIST training pixels in [0, 1]; fixed constants (not recomputed
# per subset) so that every node normalises identically.
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (device id, round, purpose...).

    Hashing (rather than ``seed + round``) keeps the streams of different purposes independent:
    the activation sampler of device 3 in round 7 never shares a stream with training.
    """
    text = repr((int(seed), *(str(k) for k in keys))).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Split:
    """A labelled image set: ``x`` float32 (N, 1, 28, 28) normalised, ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(f"Split shapes disagree: x {self.x.shape}, y {self.y.shape}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray | Sequence[int]) -> Split:
        """The samples at ``idx`` (copies, in that order)."""
        index = np.asarray(idx, dtype=np.int64)
        return Split(self.x[index], self.y[index])


def _has_idx_files(directory: Path) -> bool:
    return all(
        (directory / name).is_file() or (directory / f"{name}.gz").is_file()
        for name in _FILES.values()
    )


def find_data_dir(explicit: str | Path | None = None) -> Path:
    """The directory holding the four Fashion-MNIST IDX files.

    Tried in order: ``explicit``, ``$EMO_DATA_DIR``, ``/usr/share/datasets/fashion-mnist``;
    each as given and in its torchvision layout ``<dir>/FashionMNIST/raw``. An explicit
    directory that lacks the files is an error (no silent fallback to another copy).
    """
    candidates: list[Path]
    if explicit is not None:
        candidates = [Path(explicit)]
    elif os.environ.get("EMO_DATA_DIR"):
        candidates = [Path(os.environ["EMO_DATA_DIR"])]
    else:
        candidates = [DEFAULT_DATA_DIR]
    tried: list[str] = []
    for base in candidates:
        for directory in (base, base / "FashionMNIST" / "raw"):
            tried.append(str(directory))
            if _has_idx_files(directory):
                return directory
    raise ConfigError(
        "Fashion-MNIST IDX files not found (tried: "
        + ", ".join(tried)
        + "). Install them with `apt-get install dataset-fashion-mnist`, or point to a copy "
        "with `--data-dir DIR` / $EMO_DATA_DIR (IDX files, gzipped or not, or a torchvision "
        "FashionMNIST download)."
    )


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Decode one IDX file of unsigned bytes, validating its header against its size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 + 4 * expected_dims:
        raise ConfigError(f"corrupt IDX file {path}: {len(raw)} bytes is too short")
    zero, dtype_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim != expected_dims:
        raise ConfigError(
            f"corrupt IDX file {path}: magic {raw[:4].hex()} (want 0000080{expected_dims})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    if len(raw) - header != int(np.prod(dims)):
        raise ConfigError(
            f"corrupt IDX file {path}: header says {dims} but it holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(directory: Path, name: str) -> Path:
    plain = directory / name
    return plain if plain.is_file() else directory / f"{name}.gz"


@functools.lru_cache(maxsize=4)
def _load_cached(directory: str) -> tuple[Split, Split]:
    base = Path(directory)
    arrays = {
        key: _read_idx(_idx_path(base, name), 3 if key.endswith("images") else 1)
        for key, name in _FILES.items()
    }
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ConfigError(
                f"IDX files in {base} disagree: {part} images {images.shape}, labels {labels.shape}"
            )
        if labels.size and int(labels.max()) >= NUM_CLASSES:
            raise ConfigError(f"IDX labels in {base} exceed {NUM_CLASSES - 1}")
        # A 256-entry lookup table normalises in one gather, several times faster than
        # float arithmetic over 47M pixels.
        lut = ((np.arange(256, dtype=np.float64) / 255.0 - FMNIST_MEAN) / FMNIST_STD).astype(
            np.float32
        )
        x = lut[images][:, None]
        y = labels.astype(np.int64)
        # The arrays are shared by every caller of the cache: freeze them so nobody can
        # corrupt another node's data in place.
        x.setflags(write=False)
        y.setflags(write=False)
        splits.append(Split(x, y))
    return splits[0], splits[1]


def load_fashion_mnist(data_dir: str | Path | None = None) -> tuple[Split, Split]:
    """``(train, test)`` Fashion-MNIST splits; decoded once per process, then cached.

    The returned arrays are read-only; ``Split.subset`` gives writable copies.
    Raises :class:`ConfigError` when the files are missing or corrupt.
    """
    directory = find_data_dir(data_dir)
    return _load_cached(str(directory.resolve()))


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
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Non-IID label-skewed partition: per class, Dirichlet(alpha) shares over devices.

    The standard scheme (Yurochkin et al. 2019, Hsu et al. 2019): for each class the indices are
    shuffled and cut by proportions drawn from Dir(alpha); a device that already holds more
    than N / n_devices samples gets no more (keeps sizes bounded). Draws are repeated until
    every device holds at least ``min_size`` samples. Small alpha means strong skew.
    Deterministic for a given ``seed``.
    """
    y = np.asarray(labels)
    n = int(y.shape[0])
    if n_devices < 1:
        raise ConfigError(f"n_devices must be >= 1, got {n_devices}")
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if min_size * n_devices > n:
        raise ConfigError(f"cannot give {n_devices} devices {min_size} samples each from {n}")
    rng = np.random.default_rng(derive_seed(seed, "partition-dirichlet", alpha))
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        sizes = np.zeros(n_devices, dtype=np.int64)
        for c in classes:
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
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) partition gave all {n_devices} devices >= {min_size} "
        f"samples in {max_tries} tries; raise alpha or lower min_size"
    )


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
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """int64 (n_parts, num_classes): how many samples of each class every part holds."""
    y = np.asarray(labels)
    return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts]).astype(np.int64)
