"""Plots and a short Markdown report of an ``emo run``, written next to ``summary.json``.

:func:`write_report` reads only the summary (the dict ``emo run`` writes as summary.json),
so it can be re-run on an old run directory::

    python -c "import json, pathlib, emo_mqtt.report as r; d = pathlib.Path('runs/quickstart');
    r.write_report(json.loads((d / 'summary.json').read_text()), d)"

It writes three PNG line plots, one line per algorithm (matplotlib, headless ``Agg``
backend, imported only here):

- ``accuracy_vs_round.png``: test accuracy (the model each algorithm deploys) per FL round;
- ``accuracy_vs_bytes.png``: the same against cumulative MQTT payload megabytes published by
  the algorithm's nodes (``bytes_per_round``, sampled by the monitor at each round event);
- ``accuracy_vs_time.png``: the same against seconds since the run started
  (``time_per_round_s``: real time, through the shaped network when the scenario has one);

and ``report.md``: the comparison table, the headline comparisons and links to the plots.

The top of an ``emo run --seeds`` directory (a summary with ``seeds``) gets ``report.md``
only: every figure as mean ± sample std over the seeds, and links to each seed's own
report and plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "write_report"]

#: File name, x-axis label and how to get the x values of one algorithm.
PLOTS = (
    ("accuracy_vs_round.png", "FL round", "round"),
    ("accuracy_vs_bytes.png", "cumulative MB published (MQTT payload)", "bytes"),
    ("accuracy_vs_time.png", "time since the run started (s)", "time"),
)

#: Markers and dashes vary by line, so curves that coincide stay distinguishable.
_MARKERS = ("o", "s", "^", "D", "v", "P")
_STYLES = ("-", "--", "-.", ":")

_COMPARISON_TEXT = {
    "emo_minus_fl_points": "EMO accuracy minus FL accuracy (points)",
    "fl_model_identical_with_overlays": "FL model bit-identical with and without overlays",
    "sfl_bytes_over_emo_bytes": "SFL bytes / EMO bytes",
    "sfl_time_over_emo_time": "SFL training time / EMO training time",
    "sfl_time_to_target_over_emo": "SFL time to the target accuracy / EMO's",
    "common_accuracy": "best accuracy both SFL and EMO reached",
    "sfl_time_to_common_over_emo": "SFL time to that common accuracy / EMO's",
    "controller_activation_bytes_saved": "activation bytes saved by the controller (fraction)",
    "controller_total_bytes_saved": "total bytes saved by the controller (fraction)",
    "controller_accuracy_cost_points": "accuracy cost of the controller (points)",
}


def _x_values(entry: dict[str, Any], axis: str) -> tuple[list[float], bool]:
    """The x values of one algorithm's curve, and whether they are estimated."""
    n = len(entry.get("accuracy_per_round", []))
    if axis == "round":
        return [float(r) for r in range(1, n + 1)], False
    if axis == "time":
        times = entry.get("time_per_round_s", entry.get("wall_per_round_s", []))
        return [float(t) for t in times][:n], False
    per_round = entry.get("bytes_per_round")
    if per_round and len(per_round) >= n and all(b is not None for b in per_round[:n]):
        return [float(b) / 1e6 for b in per_round[:n]], False
    # Older summaries: spread the algorithm's total evenly over its rounds.
    total = float(entry.get("bytes", 0)) / 1e6
    return [total * (r / n) for r in range(1, n + 1)], True


def _plot(
    algorithms: dict[str, dict[str, Any]], axis: str, xlabel: str, title: str, path: Path
) -> bool:
    """Draw one plot; whether any x values were estimated."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=110)
    estimated = False
    try:
        for i, (name, entry) in enumerate(algorithms.items()):
            ys = [float(a) for a in entry.get("accuracy_per_round", [])]
            xs, est = _x_values(entry, axis)
            n = min(len(xs), len(ys))
            if n == 0:
                continue
            estimated |= est
            label = name + (" (bytes estimated)" if est else "")
            ax.plot(
                xs[:n],
                ys[:n],
                marker=_MARKERS[i % len(_MARKERS)],
                linestyle=_STYLES[i % len(_STYLES)],
                markersize=5,
                linewidth=1.8,
                label=label,
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (per-round eval subset)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if axis == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(loc="best", framealpha=0.85)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return estimated


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:g}"
    return str(value)


def _table(algorithms: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| algorithm | accuracy | FL model accuracy | MB sent | activation MB | time s "
        "| rounds | s to target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in algorithms.items():
        by_kind = a.get("bytes_by_kind", {})
        lines.append(
            f"| {name} | {float(a['accuracy']):.4f} | {float(a['fl_accuracy']):.4f} "
            f"| {float(a.get('bytes', 0)) / 1e6:.2f} "
            f"| {float(by_kind.get('activations', 0)) / 1e6:.2f} "
            f"| {float(a.get('sim_time_s', a.get('wall_s', 0))):.1f} | {a.get('rounds', '-')} "
            f"| {_fmt(a.get('time_to_target_s', a.get('wall_to_target_s')))} |"
        )
    return lines


def _write_seeds_report(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """``report.md`` of an ``emo run --seeds`` directory; its path, in a list."""
    from emo_mqtt.aggregate_seeds import COLUMNS, pm, seeds_rows

    scenario = summary.get("scenario") or "?"
    config = summary.get("config", {})
    run = config.get("run", {}) if isinstance(config, dict) else {}
    seeds = summary.get("seeds", [])
    lines = [f"# emo run: {run.get('name', Path(str(scenario)).stem)}, {len(seeds)} seeds", ""]
    lines.append(
        f"Scenario `{scenario}`, seeds {', '.join(str(s) for s in seeds)} (each a complete "
        "run in its own directory). Figures are mean ± sample standard deviation (ddof=1) "
        "over the seeds that have a value; `(k null)` counts the seeds without one (a "
        "target never reached, an algorithm that did not run)."
    )
    if summary.get("state") != "finished":
        cut = summary.get("interrupted", {})
        lines += [
            "",
            f"**{summary.get('state')}**: during seed {cut.get('seed', '?')} "
            f"({cut.get('algorithm', '?')}, round {cut.get('last_round', '?')}); only the "
            "seeds marked finished are aggregated.",
        ]
    lines += ["", "## Seeds", "", "| seed | state | run id | report |", "|---|---|---|---|"]
    for seed, info in summary.get("runs", {}).items():
        where = info.get("dir", f"seed-{seed}")
        lines.append(
            f"| {seed} | {info.get('state')} | {info.get('run_id')} "
            f"| [{where}/report.md]({where}/report.md) |"
        )
    header = ["algorithm", *(h for h, _, _, _ in COLUMNS)]
    lines += [
        "",
        "## Comparison (mean ± std)",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in seeds_rows(summary)]
    comps = summary.get("comparisons", {})
    if comps:
        lines += ["", "## Headline figures (mean ± std)", ""]
        for key, figure in comps.items():
            lines.append(
                f"- {_COMPARISON_TEXT.get(key, key)} (`{key}`): {pm(figure, digits=4)} "
                f"(values {', '.join(_fmt(v) for v in figure.get('values', []))})"
            )
    lines += [
        "",
        "Every figure of every algorithm, aggregated, is in [summary.json](summary.json).",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report]


def write_report(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the PNG plots and ``report.md`` for ``summary`` into ``out_dir``; their paths.

    For an ``emo run --seeds`` summary (with ``seeds``): ``report.md`` only."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "seeds" in summary:
        return _write_seeds_report(summary, out_dir)
    algorithms: dict[str, dict[str, Any]] = summary.get("algorithms", {})
    scenario = summary.get("scenario") or "?"
    written: list[Path] = []
    estimated = False
    for filename, xlabel, axis in PLOTS:
        path = out_dir / filename
        title = f"accuracy vs {axis} ({Path(str(scenario)).name})"
        estimated |= _plot(algorithms, axis, xlabel, title, path)
        written.append(path)

    config = summary.get("config", {})
    run = config.get("run", {}) if isinstance(config, dict) else {}
    fleet = config.get("fleet", {}) if isinstance(config, dict) else {}
    lines = [f"# emo run: {run.get('name', Path(str(scenario)).stem)}", ""]
    lines.append(
        f"Scenario `{scenario}`: {fleet.get('devices', '?')} devices, "
        f"{fleet.get('overlays', '?')} overlays, {run.get('rounds', '?')} rounds, "
        f"target accuracy {_fmt(run.get('target_accuracy'))}. Accuracy is on the whole "
        "test set for the model each algorithm deploys (the ensemble for EMO); bytes "
        "are MQTT payload bytes published by all the algorithm's nodes; time is "
        "seconds since the run started"
        + (
            ", through the scenario's shaped network."
            if config.get("network")
            else " (no network shaping)."
        )
    )
    lines += ["", "## Comparison", "", *_table(algorithms), ""]
    comps = summary.get("comparisons", {})
    if comps:
        lines += ["## Headline figures", ""]
        for key, value in comps.items():
            lines.append(f"- {_COMPARISON_TEXT.get(key, key)} (`{key}`): {_fmt(value)}")
        lines.append("")
    lines += ["## Bytes by kind (MB)", ""]
    kinds = sorted({k for a in algorithms.values() for k in a.get("bytes_by_kind", {})})
    lines.append("| algorithm | " + " | ".join(kinds) + " |")
    lines.append("|---|" + "---:|" * len(kinds))
    for name, a in algorithms.items():
        by_kind = a.get("bytes_by_kind", {})
        lines.append(
            f"| {name} | "
            + " | ".join(f"{float(by_kind.get(k, 0)) / 1e6:.3f}" for k in kinds)
            + " |"
        )
    lines += ["", "## Plots", ""]
    for (_, _, axis), path in zip(PLOTS, written, strict=True):
        lines += [f"![accuracy vs {axis}]({path.name})", ""]
    if estimated:
        lines += [
            "Some summaries had no `bytes_per_round`: their bytes axis spreads the "
            "total evenly over the rounds (marked *bytes estimated*).",
            "",
        ]
    lines += ["The full figures are in [summary.json](summary.json)."]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    written.append(report)
    return written
