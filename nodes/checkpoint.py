"""Checkpoints of a node's state: numpy arrays in an ``.npz``, the rest in JSON. No pickle.

Both files are written under temporary names and renamed, the arrays first: a crash while
writing keeps the previous checkpoint, and a JSON file never names a state newer than the
arrays beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_checkpoint(
    directory: Path, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Write ``<directory>/<name>.npz`` and ``<directory>/<name>.json`` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    npz, doc = directory / f"{name}.npz", directory / f"{name}.json"
    with open(npz.with_suffix(".npz.tmp"), "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    doc.with_suffix(".json.tmp").write_text(json.dumps(meta, default=float))
    npz.with_suffix(".npz.tmp").replace(npz)
    doc.with_suffix(".json.tmp").replace(doc)


def read_checkpoint(
    directory: Path | None, name: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and metadata of a checkpoint, or None when there is none."""
    if directory is None:
        return None
    npz, doc = directory / f"{name}.npz", directory / f"{name}.json"
    if not (npz.exists() and doc.exists()):
        return None
    meta = json.loads(doc.read_text())
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, meta
