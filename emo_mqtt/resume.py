"""``emo run --resume``: what an output directory already holds, and what is left to run.

Pure decisions, no I/O beyond what the caller passes in:

- :func:`comparable_config` / :func:`config_digest`: the part of a resolved configuration
  that must match for a resume to be honest. The run id (fresh at every start), the list of
  algorithms (a resume may add some) and, for ``--seeds``, ``run.seed`` (each seed sets its
  own) are left out; everything else (rounds, data, fleet, models...) must be identical.
- :func:`config_differences`: the keys that differ, for a clear refusal.
- :func:`plan_algorithms`: which algorithms of a run directory are kept, which are run.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ResumePlan",
    "comparable_config",
    "config_differences",
    "config_digest",
    "plan_algorithms",
]

#: ``run`` keys a resume may change: the id is new at every start, algorithms may be added.
_FREE_RUN_KEYS = ("id", "algorithms")


def comparable_config(config: Mapping[str, Any], *, seeded: bool = False) -> dict[str, Any]:
    """``config`` (a :meth:`RunConfig.to_dict`) without what a resume may change; with
    ``seeded`` (``--seeds``) without ``run.seed`` too. JSON-normalised (tuples -> lists)."""
    out: dict[str, Any] = json.loads(json.dumps(copy.deepcopy(dict(config)), default=str))
    run = out.get("run", {})
    for key in (*_FREE_RUN_KEYS, *(("seed",) if seeded else ())):
        run.pop(key, None)
    return out


def config_digest(comparable: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a :func:`comparable_config`."""
    text = json.dumps(comparable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (a key only on one
    side shows ``(absent)`` on the other), sorted."""
    a, b = _flat(old), _flat(new)
    absent = "(absent)"
    return [
        f"{key}: {json.dumps(a[key]) if key in a else absent} -> "
        f"{json.dumps(b[key]) if key in b else absent}"
        for key in sorted(set(a) | set(b))
        if a.get(key, absent) != b.get(key, absent)
    ]


@dataclass
class ResumePlan:
    """What to do with one run directory: ``keep`` the entries of finished algorithms, and
    ``run`` the others (in the order asked)."""

    keep: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Nothing left to run."""
        return not self.run


def plan_algorithms(
    previous: Mapping[str, Any] | None,
    wanted: list[str],
    has_model: Callable[[str], bool],
) -> ResumePlan:
    """Split ``wanted`` into algorithms to keep and algorithms to run.

    ``previous`` is the directory's summary.json (None if there is none: everything runs).
    An algorithm is kept when the summary lists it among its ``algorithms`` (only finished
    ones are listed: an interrupted run names the one it cut in ``interrupted``) and
    ``has_model(name)`` says its saved FL model is there; otherwise it runs again from the
    start. Finished algorithms that are not ``wanted`` are kept too (their results are in
    the directory; the summary keeps listing them), after the wanted ones.
    """
    done: Mapping[str, Any] = (previous or {}).get("algorithms", {}) or {}
    plan = ResumePlan()
    for name in wanted:
        entry = done.get(name)
        if isinstance(entry, dict) and has_model(name):
            plan.keep[name] = entry
        else:
            plan.run.append(name)
    for name, entry in done.items():
        extra = name not in wanted and isinstance(entry, dict)
        if extra and has_model(name):
            plan.keep[name] = entry
    return plan
