"""``emo run --out``: checked, and claimed, before anything starts.

An output directory that is a file, or that holds another run's results, is found before
the broker starts and the data is loaded, not after the training (a file) or never (stale
results of an earlier run beside the new ones, which ``emo infer`` would then read).

A directory ``emo run`` writes to is marked with :data:`MARKER` from the start, so that
even an interrupted run's directory is recognised as one. ``--overwrite`` clears only such
directories: a non-empty directory without the marker is refused either way, since it may
hold anything of the user's.

``--resume`` keeps such a directory instead: the marker records the run's comparable
configuration (:func:`emo_mqtt.resume.comparable_config`) and its hash, and a resume with a
different configuration is refused, naming the keys that differ.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from emo_mqtt.errors import ConfigError
from emo_mqtt.resume import config_differences, config_digest

#: The file that marks a directory as an ``emo run`` output directory.
MARKER = ".emo-run.json"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds an ``emo run``'s outputs (its marker, or a summary)."""
    return (path / MARKER).is_file() or (path / "summary.json").is_file()


def read_json(path: Path) -> dict[str, Any] | None:
    """``path``'s JSON object, or None if it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _recorded_config(out: Path) -> tuple[dict[str, Any] | None, list[int] | None]:
    """The comparable config and seeds the marker of ``out`` records (None, None: none)."""
    marker = read_json(out / MARKER) or {}
    config = marker.get("config")
    seeds = marker.get("seeds")
    return (config if isinstance(config, dict) else None), (
        [int(s) for s in seeds] if isinstance(seeds, list) else None
    )


def check_out(
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
) -> None:
    """Raise :class:`ConfigError` if ``out`` may not be used; touches nothing.

    New or empty: fine. Another run's outputs: refused unless ``overwrite``, or ``resume``
    with the same ``config`` (a :func:`~emo_mqtt.resume.comparable_config`) and the same
    kind of run (``seeds`` given or not) as recorded there. A file, or a non-empty
    directory that is not a run's: refused.
    """
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other: choose one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory; choose a directory")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not is_run_dir(out):
        raise ConfigError(
            f"--out {out}: a non-empty directory that is not an emo run's output; "
            "choose a new or empty directory"
        )
    if resume:
        _check_resumable(out, config, seeds)
    elif not overwrite:
        raise ConfigError(
            f"--out {out}: holds the results of another run; add --overwrite to replace "
            "them, --resume to finish it, or choose another --out"
        )


def _check_resumable(out: Path, config: dict[str, Any] | None, seeds: list[int] | None) -> None:
    recorded, recorded_seeds = _recorded_config(out)
    if recorded is None:
        raise ConfigError(
            f"--out {out}: cannot resume: it records no configuration (written by an older "
            "emo run); use --overwrite or another --out"
        )
    if (recorded_seeds is None) != (seeds is None):
        was = "a run with --seeds" if recorded_seeds is not None else "a run without --seeds"
        raise ConfigError(f"--out {out}: cannot resume: it holds {was}; resume it the same way")
    if config is not None and config_digest(recorded) != config_digest(config):
        diff = config_differences(recorded, config)
        shown = "; ".join(diff[:5]) + (f"; ... ({len(diff)} in all)" if len(diff) > 5 else "")
        raise ConfigError(
            f"--out {out}: cannot resume: the configuration changed since that run "
            f"({shown}); run it as before, or use --overwrite or another --out"
        )


def prepare_out(
    out: Path,
    run: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
) -> None:
    """:func:`check_out`, then claim ``out`` for ``run``: cleared if it held another run
    (``overwrite``; kept with ``resume``), created, and marked (with ``config``, its hash
    and ``seeds``, for a later ``--resume``)."""
    check_out(out, overwrite=overwrite, resume=resume, config=config, seeds=seeds)
    if not resume and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker: dict[str, Any] = {
            "run": run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if config is not None:
            marker.update(config=config, config_sha256=config_digest(config), seeds=seeds)
        (out / MARKER).write_text(json.dumps(marker) + "\n")
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there: {exc.strerror or exc}") from exc
