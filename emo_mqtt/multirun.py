"""``emo run --seeds`` and ``--resume``: wrappers around :func:`emo_mqtt.fleet.run_scenario`.

``--seeds 1,2,3`` runs the whole scenario once per seed, each a complete run of its own
(run id ``<id>-s<seed>``, ``run.seed`` set to the seed) in ``<out>/seed-<seed>/`` (a run
directory like any other: ``emo infer <out>/seed-1`` works), then writes the mean and
sample standard deviation of every figure over the seeds into ``<out>/summary.json``
(:mod:`emo_mqtt.aggregate_seeds`) and a summary table into ``<out>/report.md``.

``--resume`` keeps what an output directory already holds (:mod:`emo_mqtt.resume`): the
algorithms that finished, with their saved models, and, under ``--seeds``, the seeds that
finished; it runs the rest and writes the combined summary.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emo_mqtt.aggregate_seeds import aggregate
from emo_mqtt.config import RunConfig
from emo_mqtt.fleet import Interrupted, OnEvent, Say, run_scenario
from emo_mqtt.outdir import prepare_out, read_json
from emo_mqtt.resume import ResumePlan, comparable_config, plan_algorithms

if TYPE_CHECKING:
    from emo_mqtt.broker.sites import SiteBrokers

__all__ = [
    "config_record",
    "plan_dir",
    "run_once",
    "run_seeds",
    "seed_config",
    "seed_dir",
]


def seed_config(config: RunConfig, seed: int) -> RunConfig:
    """``config`` (with its run id) for one seed: ``run.seed`` is the seed, the id
    ``<id>-s<seed>``. Raises ConfigError if that id is too long."""
    return config.with_overrides(run={"seed": seed, "id": f"{config.run.id}-s{seed}"})


def seed_dir(out: Path, seed: int) -> Path:
    """Where one seed's run writes."""
    return out / f"seed-{seed}"


def config_record(config: RunConfig, *, seeded: bool = False) -> dict[str, Any]:
    """What ``--out``'s marker records of ``config``, for a later ``--resume`` to compare."""
    return comparable_config(config.to_dict(), seeded=seeded)


def plan_dir(out: Path, wanted: list[str]) -> tuple[ResumePlan, dict[str, Any] | None]:
    """The resume plan of one run directory, and its previous summary (None if none)."""
    previous = read_json(out / "summary.json")
    plan = plan_algorithms(previous, wanted, lambda a: (out / a / "fl_model.npz").is_file())
    return plan, previous


async def run_once(
    broker: Any,
    config: RunConfig,
    out: Path | None,
    *,
    resume: bool = False,
    say: Say = print,
    on_event: OnEvent | None = None,
    sites: SiteBrokers | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """One run of ``config`` into ``out``; with ``resume``, the finished algorithms of
    ``out`` are kept and only the others run (their leftovers cleared first). ``workers``:
    worker processes for the devices and overlays (:func:`emo_mqtt.fleet.run_scenario`)."""
    keep: dict[str, dict[str, Any]] = {}
    if resume and out is not None:
        plan, previous = plan_dir(out, list(config.run.algorithms))
        if plan.complete and previous is not None and previous.get("state") == "finished":
            say(f"resume: {out}: every algorithm finished already ({', '.join(plan.keep)})")
            return previous
        for name in plan.run:  # an interrupted algorithm's partial log and spill
            shutil.rmtree(out / name, ignore_errors=True)
        keep = plan.keep
        if keep:
            say(f"resume: kept {', '.join(keep)}; running {', '.join(plan.run) or 'nothing'}")
    return await run_scenario(
        broker, config, out, say=say, on_event=on_event, keep=keep, sites=sites, workers=workers
    )


def _seeds_summary(
    config: RunConfig,
    seeds: list[int],
    runs: dict[int, dict[str, Any]],
    states: dict[int, dict[str, Any]],
    state: str,
) -> dict[str, Any]:
    """The top summary: per-seed states, and every figure aggregated over the finished
    seeds (``values`` aligned with ``seeds``: null for a seed that did not finish)."""
    finished = {s: runs[s] if states[s]["state"] == "finished" else {} for s in seeds}
    agg = aggregate(finished)
    base = config.to_dict()
    base["run"].pop("seed", None)  # each seed's own is in its seed-<n>/summary.json
    return {
        "scenario": config.source,
        "run_id": config.run.id,
        "state": state,
        "config": base,
        "seeds": seeds,
        "std": "sample standard deviation (ddof=1) over the seeds whose value is not null",
        "runs": {str(s): states[s] for s in seeds},
        "algorithms": agg["algorithms"],
        "comparisons": agg["comparisons"],
    }


def _write(summary: dict[str, Any], out: Path, *, report: bool) -> list[Path]:
    from emo_mqtt.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return write_report(summary, out) if report else []


async def run_seeds(
    broker: Any,
    config: RunConfig,
    seeds: list[int],
    out: Path,
    *,
    resume: bool = False,
    say: Say = print,
    on_event: OnEvent | None = None,
    sites: SiteBrokers | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Run ``config`` once per seed into ``<out>/seed-<n>/``; the top summary (also written
    to ``<out>/summary.json`` after each seed, and with ``report.md`` at the end).

    Interrupted during seed k: the seeds before it keep their outputs, seed k's directory
    holds what it finished (as any interrupted run), and the top summary says
    ``"state": "interrupted"`` with ``interrupted.seed`` = k; raises :class:`Interrupted`.
    """
    configs = {s: seed_config(config, s) for s in seeds}
    runs: dict[int, dict[str, Any]] = {}
    states: dict[int, dict[str, Any]] = {
        s: {"state": "not_started", "run_id": configs[s].run.id, "dir": seed_dir(out, s).name}
        for s in seeds
    }
    for i, s in enumerate(seeds, 1):
        cfg, where = configs[s], seed_dir(out, s)

        def tagged(event: dict[str, Any], s: int = s) -> None:
            if on_event is not None:
                kind = "seed_done" if event.get("event") == "done" else event.get("event")
                on_event({**event, "event": kind, "seed": s})

        if resume:
            plan, previous = plan_dir(where, list(cfg.run.algorithms))
            if plan.complete and previous is not None and previous.get("state") == "finished":
                say(f"=== seed {s} ({i}/{len(seeds)}): finished in the earlier run, kept")
                runs[s] = previous
                states[s].update(state="finished", run_id=previous.get("run_id"), kept=True)
                continue
        prepare_out(where, str(cfg.run.id), resume=resume, config=config_record(cfg))
        say(f"=== seed {s} ({i}/{len(seeds)}): run {cfg.run.id} -> {where}")
        states[s]["state"] = "running"
        try:
            runs[s] = await run_once(
                broker,
                cfg,
                where,
                resume=resume,
                say=say,
                on_event=tagged,
                sites=sites,
                workers=workers,
            )
        except (Interrupted, asyncio.CancelledError) as exc:
            states[s]["state"] = "interrupted"
            top = _seeds_summary(config, seeds, runs, states, "interrupted")
            cut = (
                exc.summary["interrupted"]
                if isinstance(exc, Interrupted)
                else {"algorithm": cfg.run.algorithms[0], "last_round": 0}
            )
            top["interrupted"] = {"seed": s, "rounds": cfg.run.rounds, **cut}
            top["interrupted"]["seeds_not_started"] = seeds[i:]
            await asyncio.to_thread(_write, top, out, report=bool(runs))
            raise Interrupted(top) from None
        except Exception as exc:
            # A failed seed (a node died, a deadline passed) ends the command with its error;
            # the top summary says which seed failed, and --resume runs it again.
            states[s]["state"] = "failed"
            top = _seeds_summary(config, seeds, runs, states, "failed")
            top["failed"] = {"seed": s, "error": str(exc) or repr(exc)}
            _write(top, out, report=False)
            raise
        states[s]["state"] = "finished"
        # Written here and now (a small file): no await, so a signal cannot land between
        # this seed's end and the record of it.
        _write(_seeds_summary(config, seeds, runs, states, "running"), out, report=False)
    top = _seeds_summary(config, seeds, runs, states, "finished")
    written = _write(top, out, report=True)  # JSON and Markdown only: small
    say(f"report: {out / 'report.md'} (mean ± std over seeds {', '.join(map(str, seeds))})")
    if on_event is not None:
        on_event(
            {
                "event": "done",
                "summary": str(out / "summary.json"),
                "report": [str(p) for p in written],
                "seeds": seeds,
                "algorithms": top["algorithms"],
                "comparisons": top["comparisons"],
            }
        )
    return top
