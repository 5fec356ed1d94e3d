"""``emo run --out``: checked, and claimed, before anything starts.

An output directory that is a file, or that holds another run's results, is found before
the broker starts and the data is loaded, not after the training (a file) or never (stale
results of an earlier run beside the new ones, which ``emo infer`` would then read).

A directory ``emo run`` writes to is marked with :data:`MARKER` from the start, so that
even an interrupted run's directory is recognised as one. ``--overwrite`` clears only such
directories: a non-empty directory without the marker is refused either way, since it may
hold anything of the user's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from emo_mqtt.errors import ConfigError

#: The file that marks a directory as an ``emo run`` output directory.
MARKER = ".emo-run.json"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds an ``emo run``'s outputs (its marker, or a summary)."""
    return (path / MARKER).is_file() or (path / "summary.json").is_file()


def check_out(out: Path, *, overwrite: bool = False) -> None:
    """Raise :class:`ConfigError` if ``out`` may not be used; touches nothing.

    New or empty: fine. Another run's outputs: refused unless ``overwrite``. A file, or a
    non-empty directory that is not a run's: refused.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not is_run_dir(out):
            raise ConfigError(
                f"--out {out}: a non-empty directory that is not an emo run's output; "
                "choose a new or empty directory"
            )
        if not overwrite:
            raise ConfigError(
                f"--out {out}: holds the results of another run; add --overwrite to replace "
                "them, or choose another --out"
            )


def prepare_out(out: Path, run: str, *, overwrite: bool = False) -> None:
    """:func:`check_out`, then claim ``out`` for ``run``: cleared if it held another run
    (``overwrite``), created, and marked."""
    check_out(out, overwrite=overwrite)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker = {"run": run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (out / MARKER).write_text(json.dumps(marker) + "\n")
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there: {exc.strerror or exc}") from exc
