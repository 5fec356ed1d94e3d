"""Mean and spread over the seeds of ``emo run --seeds``: pure, no I/O.

Every figure is aggregated the same way, into ``{"mean", "std", "values"}``:

- ``values``: one entry per seed, in the order of the seeds; ``null`` (None) where that
  seed has no number for it (the key is missing, or is ``null`` there: ``time_to_target_s``
  of a seed that never reached the target, a comparison whose algorithms did not both run);
- ``mean``: the mean of the values present (None if none is);
- ``std``: the **sample** standard deviation (``ddof=1``, Bessel's correction) of the
  values present; None with fewer than two of them (one value has no spread to estimate);
- ``n``: how many values are present (what the mean and std are over).

Booleans count as 0 and 1 (``fl_model_identical_with_overlays``: the mean is the fraction
of seeds where it held); their ``values`` stay booleans. Nothing is picked by name: every
numeric key of ``comparisons``, and of each algorithm's entry (nested dicts such as
``bytes_by_kind`` flattened to dotted keys, ``bytes_by_kind.activations``), is aggregated,
so keys added to the summary later are aggregated without a change here. Lists (per-round
curves) and strings are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "COLUMNS",
    "aggregate",
    "flatten_numbers",
    "mean_std",
    "pm",
    "seeds_rows",
    "seeds_table",
    "stats",
]

Number = int | float | bool


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and (
        isinstance(value, bool) or math.isfinite(float(value))
    )


def flatten_numbers(entry: Mapping[str, Any], prefix: str = "") -> dict[str, Number | None]:
    """The numeric leaves of ``entry`` by dotted key; ``null`` leaves kept as None.

    A None is kept (rather than dropped) so that a figure that is ``null`` in every seed,
    such as a target never reached, still shows in the aggregate, as all-null values.
    """
    out: dict[str, Number | None] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, f"{name}."))
        elif value is None or _is_number(value):
            out[name] = value
    return out


def mean_std(values: Iterable[Number | None]) -> tuple[float | None, float | None, int]:
    """The mean and sample standard deviation (ddof=1) of the values that are not None,
    and how many there are; None for what cannot be estimated."""
    present = [float(v) for v in values if v is not None]
    n = len(present)
    if n == 0:
        return None, None, 0
    mean = math.fsum(present) / n
    if n < 2:
        return mean, None, n
    var = math.fsum((v - mean) ** 2 for v in present) / (n - 1)
    return mean, math.sqrt(var), n


def stats(values: list[Number | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` of one figure over the seeds (see the module)."""
    mean, std, n = mean_std(values)
    return {
        "mean": None if mean is None else round(mean, 6),
        "std": None if std is None else round(std, 6),
        "n": n,
        "values": list(values),
    }


def _aggregate_entries(entries: list[Mapping[str, Any] | None]) -> dict[str, Any]:
    """One ``stats`` per key found in any of ``entries`` (None: a seed without the entry)."""
    flat = [flatten_numbers(e) if e is not None else {} for e in entries]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    return {k: stats([f.get(k) for f in flat]) for k in keys}


def aggregate(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The aggregate of the summaries of several seeds (seed -> that seed's summary.json).

    Returns ``{"seeds", "algorithms", "comparisons"}``: ``algorithms`` maps each algorithm
    found in any seed to ``{figure: stats}``; ``comparisons`` maps each comparison to its
    ``stats``. An algorithm or comparison missing from a seed is a None in its values.
    """
    seeds = list(runs)
    names: list[str] = []
    for summary in runs.values():
        names += [a for a in summary.get("algorithms", {}) if a not in names]
    algorithms = {
        name: _aggregate_entries([runs[s].get("algorithms", {}).get(name) for s in seeds])
        for name in names
    }
    comparisons = _aggregate_entries([runs[s].get("comparisons", {}) for s in seeds])
    return {"seeds": seeds, "algorithms": algorithms, "comparisons": comparisons}


def pm(figure: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 4) -> str:
    """``mean ± std`` of a ``stats`` dict, each divided by ``scale``: ``-`` if no mean,
    the mean alone if no std (one seed)."""
    if figure is None or figure.get("mean") is None:
        return "-"
    text = f"{figure['mean'] / scale:.{digits}f}"
    if figure.get("std") is not None:
        text += f" ± {figure['std'] / scale:.{digits}f}"
    missing = len(figure.get("values", [])) - int(figure.get("n", 0))
    return text + (f" ({missing} null)" if missing else "")


#: Columns of the printed and reported tables: header, figure, scale, digits.
COLUMNS = (
    ("accuracy", "accuracy", 1.0, 4),
    ("FL model", "fl_accuracy", 1.0, 4),
    ("MB sent", "bytes", 1e6, 2),
    ("activ. MB", "bytes_by_kind.activations", 1e6, 2),
    ("time s", "sim_time_s", 1.0, 1),
    ("to target s", "time_to_target_s", 1.0, 1),
    ("rounds", "rounds", 1.0, 1),
)


def seeds_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per algorithm of a ``--seeds`` summary: its name, then ``mean ± std`` per
    column of :data:`COLUMNS`."""
    return [
        [name, *(pm(figures.get(key), scale, digits) for _, key, scale, digits in COLUMNS)]
        for name, figures in summary["algorithms"].items()
    ]


def seeds_table(summary: dict[str, Any]) -> str:
    """The table ``emo run --seeds`` prints: mean ± std over the seeds (see :func:`pm`)."""
    header = ["algorithm", *(h for h, _, _, _ in COLUMNS)]
    rows = [header, *seeds_rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )
