"""The datasets a run can use, the labelled image split, and Fashion-MNIST loading.

Pure numpy and file reads: no torch, no network. The IDX files are those of the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), a directory given by the
user, or a torchvision download (``<dir>/FashionMNIST/raw``); gzipped or not. CIFAR-10 is read
by :mod:`emo_mqtt.cifar`; device partitions live in :mod:`emo_mqtt.partition` and seeds in
:mod:`emo_mqtt.seeds` (both re-exported here, where callers have always found them).
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo_mqtt.errors import ConfigError
from emo_mqtt.partition import (
    label_histogram,
    partition_dirichlet,
    partition_iid,
    subsample_parts,
)
from emo_mqtt.seeds import derive_seed

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "NUM_CLASSES",
    "DatasetInfo",
    "Split",
    "derive_seed",
    "find_data_dir",
    "label_histogram",
    "load_fashion_mnist",
    "partition_dirichlet",
    "partition_iid",
    "split_model_name",
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


@dataclass(frozen=True)
class DatasetInfo:
    """What a scenario can know of a dataset before reading it (to refuse bad fleets early)."""

    name: str
    #: Per-sample image shape (channels, height, width), as the models take it.
    input_shape: tuple[int, int, int]
    num_classes: int
    #: Sizes of the standard release; a user's copy may differ, which the data plan checks.
    train_samples: int
    test_samples: int


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, 60_000, 10_000),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, 50_000, 10_000),
}


def split_model_name(name: str) -> tuple[str, tuple[int, int, int]]:
    """``"cnn-small@3x32x32"`` -> ``("cnn-small", (3, 32, 32))``; no suffix: 1x28x28.

    A model name may carry the input shape it is built for, so that every node that builds a
    model from ``fl.model`` builds it for the scenario's images (Fashion-MNIST's 1x28x28 is
    the default, and then the name is the registry name as it always was).
    """
    base, sep, shape = name.partition("@")
    if not sep:
        return name, DATASETS["fashion-mnist"].input_shape
    dims = shape.lower().split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ConfigError(f"model {name!r}: the input shape after '@' must be CxHxW, e.g. 3x32x32")
    return base, (int(dims[0]), int(dims[1]), int(dims[2]))


@dataclass(frozen=True)
class Split:
    """A labelled image set: ``x`` float32 (N, C, H, W) normalised, ``y`` int64 (N,).

    (N, 1, 28, 28) for Fashion-MNIST, (N, 3, 32, 32) for CIFAR-10.
    """

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
