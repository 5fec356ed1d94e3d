"""CIFAR-10 in its binary format, from a directory the user gives.

The "binary version" of https://www.cs.toronto.edu/~kriz/cifar.html (``cifar-10-binary.tar.gz``,
which unpacks to ``cifar-10-batches-bin/``): ``data_batch_1.bin`` ... ``data_batch_5.bin``
(training, 10,000 records each) and ``test_batch.bin``. A record is one label byte (0-9)
then 3,072 pixel bytes: the 32x32 red plane, then green, then blue, rows first. Pure numpy
and file reads: no torch, no network, nothing downloaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from emo_mqtt.data import DATASETS, Split
from emo_mqtt.errors import ConfigError

__all__ = [
    "CIFAR10_DIR_ENV",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "RECORD_BYTES",
    "TEST_FILE",
    "TRAIN_FILES",
    "find_cifar10_dir",
    "load_cifar10",
]

#: Environment variable naming the directory when ``data.data_dir`` is empty.
CIFAR10_DIR_ENV = "EMO_CIFAR10_DIR"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
_SHAPE = DATASETS["cifar10"].input_shape
RECORD_BYTES = 1 + int(np.prod(_SHAPE))
# Per-channel mean and std of the CIFAR-10 training pixels in [0, 1] (the usual constants):
# fixed, so that every node normalises identically whatever subset it holds.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _missing(directory: Path) -> list[str]:
    return [name for name in (*TRAIN_FILES, TEST_FILE) if not (directory / name).is_file()]


def find_cifar10_dir(explicit: str | Path | None = None) -> Path:
    """The directory holding the six CIFAR-10 ``.bin`` files.

    ``explicit`` (``data.data_dir`` or ``--data-dir``), else ``$EMO_CIFAR10_DIR``; each as given
    and as the archive unpacks under it (``<dir>/cifar-10-batches-bin``). There is no default
    location: CIFAR-10 is not packaged, the user brings it.
    """
    if explicit is not None and str(explicit):
        base = Path(explicit)
    elif os.environ.get(CIFAR10_DIR_ENV):
        base = Path(os.environ[CIFAR10_DIR_ENV])
    else:
        raise ConfigError(
            "data.dataset = 'cifar10' needs its directory: set data.data_dir, pass "
            f"--data-dir DIR or set ${CIFAR10_DIR_ENV} to the unpacked binary version "
            "(cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    for directory in (base, base / "cifar-10-batches-bin"):
        if not _missing(directory):
            return directory
    raise ConfigError(
        f"CIFAR-10 binary files missing in {base}: {', '.join(_missing(base))} (also tried "
        f"{base / 'cifar-10-batches-bin'}); expected {', '.join(TRAIN_FILES)} and {TEST_FILE}"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 3, 32, 32) and labels (n,) of one batch file, its size validated."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read CIFAR-10 file {path}: {exc}") from exc
    if not raw or len(raw) % RECORD_BYTES:
        raise ConfigError(
            f"truncated or corrupt CIFAR-10 file {path}: {len(raw)} bytes is not a whole "
            f"number of {RECORD_BYTES}-byte records (1 label byte + 3,072 pixel bytes)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0]
    if int(labels.max()) >= DATASETS["cifar10"].num_classes:
        bad = int(np.flatnonzero(labels >= DATASETS["cifar10"].num_classes)[0])
        raise ConfigError(
            f"corrupt CIFAR-10 file {path}: record {bad} has label {int(labels[bad])} (0-9)"
        )
    return records[:, 1:].reshape(-1, *_SHAPE), labels


def _split(paths: list[Path]) -> Split:
    batches = [_read_batch(p) for p in paths]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches]).astype(np.int64)
    # One 256-entry lookup table per channel normalises in a single gather.
    levels = np.arange(256, dtype=np.float64) / 255.0
    lut = np.stack([(levels - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)])
    x = lut.astype(np.float32)[np.arange(_SHAPE[0])[None, :, None, None], images]
    # Shared by every caller of the cache: frozen, as Fashion-MNIST's arrays are.
    x.setflags(write=False)
    labels.setflags(write=False)
    return Split(x, labels)


@functools.lru_cache(maxsize=2)
def _load_cached(directory: str) -> tuple[Split, Split]:
    base = Path(directory)
    return _split([base / n for n in TRAIN_FILES]), _split([base / TEST_FILE])


def load_cifar10(data_dir: str | Path | None = None) -> tuple[Split, Split]:
    """``(train, test)`` CIFAR-10 splits, x float32 (N, 3, 32, 32) normalised per channel.

    Decoded once per process, then cached; the arrays are read-only (``Split.subset`` copies).
    The full training set takes about 0.6 GB as float32. Raises :class:`ConfigError` naming
    the file when one is missing, truncated or holds a label outside 0-9.
    """
    directory = find_cifar10_dir(data_dir)
    return _load_cached(str(directory.resolve()))
