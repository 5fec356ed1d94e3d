"""Offline EMO experiment: the fleet's own strategies on the in-memory bus, scored on validation.

No broker and no second copy of the algorithm: every variant is a whole fleet (server,
overlays, devices: the nodes and strategies ``emo run`` uses) run by
:func:`emo_mqtt.fleet.run_algorithm` on a :class:`~emo_mqtt.bus.MemoryBroker`, with the
scenario's ids, rounds (1-based) and controller configuration. What it tunes is scored on
the *validation* split, never on test data: the server's 2,000 validation images are cut in
two, one half fits the ensemble's combiner and measures drift (as in a real run), the other
half stands in for the test set. The test set is not loaded into the comparison at all.

Variants (each also reports its FL model's accuracy, bit-identical across them): the
``--algorithms`` given (default ``emo_all emo``; any of ``fl``, ``emo``, ``emo_all``,
``emo_int8``, ``emo_fixed``), ``emo`` at each ``--staleness-budget`` given (the knob that
sets the share of samples published: share = drift / budget), each at every
``--overlays`` count given. ``--set section.key=value`` overrides any scenario key. With
``emo`` and a fixed rule among the variants it prints the controller against the best fixed
rule (:func:`emo_mqtt.fleet.fixed_rule_comparisons`, on the means over seeds); every variant
prints the overlays' spill counters.

Usage::

    python benchmarks/offline_emo.py                                 # quickstart settings
    python benchmarks/offline_emo.py --seeds 1 2 --staleness-budget 0.125 0.25 0.5
    python benchmarks/offline_emo.py --algorithms emo emo_all emo_int8 emo_fixed
    python benchmarks/offline_emo.py --scenario scenarios/scaling.toml --overlays 1 2 4 \
        --algorithms emo
    python benchmarks/offline_emo.py --algorithms fl --set fl.lr=0.2 --set fl.local_epochs=1
    python benchmarks/offline_emo.py --scenario scenarios/quickstart.toml --rounds 6 --json o.json
    python benchmarks/offline_emo.py --timing                        # unit timings
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emo_mqtt.bus import MemoryBroker
from emo_mqtt.config import RunConfig, load_config
from emo_mqtt.dataplan import DataPlan, plan_data
from emo_mqtt.ensemble import Ensemble, minimize_lbfgs
from emo_mqtt.fleet import fixed_rule_comparisons, run_algorithm
from emo_mqtt.models import build_fl_model, build_overlay_model
from emo_mqtt.netscenario import NetworkConfig
from emo_mqtt.nodes import compute
from emo_mqtt.training import (
    make_generator,
    seed_everything,
    sfl_device_backward,
    sfl_server_step,
    train_local,
    train_overlay_steps,
)


def unshaped(config: RunConfig) -> RunConfig:
    """The scenario without its ``[network]`` section, which shapes real TCP connections and
    so needs a broker. Choices are scored on accuracy here; on a shaped link a slow uplink
    can also drop EMO's activations (docs/results.md), which this bus does not model."""
    if not config.network.enabled:
        return config
    return dataclasses.replace(config, network=NetworkConfig())


def tuning_plan(config: RunConfig) -> DataPlan:
    """The run's data plan with the test set replaced by half of the validation split."""
    plan = plan_data(config)
    n = len(plan.validation)
    fit = plan.validation.subset(np.arange(n // 2))
    tune = plan.validation.subset(np.arange(n // 2, n))
    return DataPlan(plan.devices, fit, tune, tune)


def one(config: RunConfig, algorithm: str, plan: DataPlan) -> dict[str, Any]:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="offline-emo-") as out:
        # An output directory gives the overlays their spill tier, as in ``emo run``.
        entry = asyncio.run(
            run_algorithm(MemoryBroker(), config, algorithm, plan, out_dir=Path(out), say=_quiet)
        )
        pooled = poolings(Path(out) / algorithm / "ensemble.npz", plan)
    return {
        "val_accuracy": entry["accuracy"],
        "fl_val_accuracy": entry["fl_accuracy"],
        # The run's model alone, calibrated as the ensemble is (on the fitting half).
        "fl_calibrated_val_accuracy": entry.get("fl_calibrated_accuracy"),
        "member_val_accuracy": entry.get("member_accuracy"),
        "activation_bytes": entry["bytes_by_kind"].get("activations", 0),
        "bytes": entry["bytes"],
        "bytes_by_kind": entry["bytes_by_kind"],
        "overlay_cache": entry.get("overlay_cache"),
        # What the server decided for the first device, round by round (share, precision).
        "decisions_first_device": [
            (d["round"], round(d["fraction"] / d["interval"], 3), d["precision"])
            for d in entry.get("controller_decisions", [])
            if d["device"] == "dev00"
        ],
        "fl_model_sha256": entry["fl_model_sha256"],
        "pooling_val_accuracy": pooled,
        "wall_s": round(time.perf_counter() - began, 1),
    }


#: The poolings compared on the same members (docs/algorithms.md, section 7).
POOLINGS: dict[str, dict[str, Any]] = {
    "log+bias": {"pooling": "log"},
    "log": {"pooling": "log", "class_bias": False},
    "linear": {"pooling": "linear"},
}


def poolings(path: Path, plan: DataPlan) -> dict[str, float] | None:
    """The run's final ensemble re-fitted with each of :data:`POOLINGS` (and the two richer
    combiners of :func:`richer_combiners`) on the fitting half of validation, scored on the
    tuning half (None without an ensemble: FL, SplitFed)."""
    if not path.exists():
        return None
    ensemble = Ensemble.load(path)
    out: dict[str, float] = {}
    for name, kwargs in POOLINGS.items():
        ensemble.fit(plan.validation, **kwargs)
        out[name] = float(ensemble.evaluate(plan.test).accuracy)
    fit = ensemble.member_proba(plan.validation.x)
    tune = ensemble.member_proba(plan.test.x)
    for name, predict in richer_combiners(fit, plan.validation.y).items():
        out[name] = float(np.mean(predict(tune).argmax(1) == plan.test.y))
    return out


def richer_combiners(probs: list[np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """Two combiners with more fitted parameters than the shipped log pool, fitted by maximum
    likelihood (L-BFGS, float64) on member probabilities ``probs`` (M of (N, C)):

    - ``classwise``: a positive weight per member and class, plus a class bias:
      ``z_c = sum_i W[i, c] log p_i[c] + b_c`` (M*C + C parameters);
    - ``stacked``: multinomial logistic regression on every member's log-probabilities,
      ``z = [log p_1 .. log p_M] A + b`` (M*C*C + C parameters, L2 1e-3 on A).

    Returns ``{name: predict}``, ``predict`` mapping member probabilities to scores.
    """
    logp = torch.from_numpy(np.log(np.clip(np.stack(probs), 1e-12, None)))  # (M, N, C)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    m, _, c = logp.shape
    theta = torch.full((m, c), float(np.log(1.0 / m)), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(c, dtype=torch.float64, requires_grad=True)

    def classwise(lp: torch.Tensor) -> torch.Tensor:
        return torch.einsum("mc,mnc->nc", torch.exp(theta), lp) + bias

    minimize_lbfgs(
        [theta, bias],
        lambda: torch.nn.functional.cross_entropy(classwise(logp), y) + 1e-3 * (bias**2).sum(),
    )
    a = torch.zeros((m * c, c), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)

    def stacked(lp: torch.Tensor) -> torch.Tensor:
        return lp.permute(1, 0, 2).reshape(lp.shape[1], m * c) @ a + b

    minimize_lbfgs(
        [a, b],
        lambda: torch.nn.functional.cross_entropy(stacked(logp), y) + 1e-3 * (a**2).sum(),
    )

    def predictor(f: Any) -> Any:
        def predict(member_probs: list[np.ndarray]) -> np.ndarray:
            lp = torch.from_numpy(np.log(np.clip(np.stack(member_probs), 1e-12, None)))
            with torch.no_grad():
                return np.asarray(f(lp).numpy())

        return predict

    return {"classwise": predictor(classwise), "stacked": predictor(stacked)}


def _quiet(_: str) -> None:
    pass


def variants(
    config: RunConfig, algorithms: list[str], budgets: list[float], overlays: list[int]
) -> list[tuple[str, RunConfig, str]]:
    """(name, configuration, algorithm) of every variant of one seed."""
    out: list[tuple[str, RunConfig, str]] = []
    for count in overlays or [config.fleet.overlays]:
        cfg = config.with_overrides(fleet={"overlays": count})
        suffix = f" overlays={count}" if overlays else ""
        for algorithm in algorithms:
            if algorithm == "emo" and budgets:
                out += [
                    (
                        f"emo budget={b:g}{suffix}",
                        cfg.with_overrides(controller={"staleness_budget": b}),
                        "emo",
                    )
                    for b in budgets
                ]
            else:
                out.append((f"{algorithm}{suffix}", cfg, algorithm))
    return out


def sweep(
    config: RunConfig,
    seeds: list[int],
    algorithms: list[str],
    budgets: list[float],
    overlays: list[int],
) -> dict[str, Any]:
    """Every variant for every seed; results by variant then seed."""
    compute.configure(config.fleet.parallel_training)
    out: dict[str, Any] = {}
    for seed in seeds:
        seeded = config.with_overrides(run={"seed": seed})
        plan = tuning_plan(seeded)
        # FL's own figure is every EMO run's ``fl_val_accuracy`` (bit-identical FL).
        for name, cfg, algorithm in variants(seeded, algorithms, budgets, overlays):
            result = one(cfg, algorithm, plan)
            out.setdefault(name, {})[str(seed)] = result
            spill = result["overlay_cache"] or {}
            pooled = result["pooling_val_accuracy"] or {}
            print(
                f"seed {seed} {name:24} val acc {result['val_accuracy']:.4f} "
                f"(FL {result['fl_val_accuracy']:.4f}) activations "
                f"{result['activation_bytes'] / 1e6:7.2f} MB  spilled "
                f"{spill.get('spill_entries_written', 0)} taken "
                f"{spill.get('spill_entries_taken', 0)}  {result['wall_s']:6.1f} s"
                + "".join(f"  {k} {v:.4f}" for k, v in pooled.items()),
                flush=True,
            )
    return out


def controller_vs_fixed(results: dict[str, Any]) -> dict[str, Any]:
    """``comparisons`` of :mod:`emo_mqtt.fleet` on the per-variant means (validation)."""
    means: dict[str, dict[str, Any]] = {}
    for name, by_seed in results.items():
        key = "emo" if name.startswith("emo budget=") else name
        if key in means or key not in ("emo", "emo_all", "emo_int8", "emo_fixed"):
            continue
        runs = list(by_seed.values())
        means[key] = {
            "accuracy": float(np.mean([r["val_accuracy"] for r in runs])),
            "bytes_by_kind": {"activations": float(np.mean([r["activation_bytes"] for r in runs]))},
        }
    return fixed_rule_comparisons(means)


def table(results: dict[str, Any]) -> str:
    ref = results.get("emo_all", {})
    lines = [
        "| variant | val acc (mean) | per seed | activation MB (mean) | saved vs emo_all |",
        "|---|---|---|---|---|",
    ]
    for name, by_seed in results.items():
        accs = [r["val_accuracy"] for r in by_seed.values()]
        mb = [r["activation_bytes"] / 1e6 for r in by_seed.values()]
        saved = ""
        if ref and name != "emo_all":
            full = np.mean([r["activation_bytes"] for r in ref.values()])
            saved = f"{1 - np.mean([r['activation_bytes'] for r in by_seed.values()]) / full:.1%}"
        lines.append(
            f"| {name} | {np.mean(accs):.4f} | "
            f"{' / '.join(f'{a:.4f}' for a in accs)} | {np.mean(mb):.1f} | {saved} |"
        )
    return "\n".join(lines)


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable), read back by :func:`parse_set`."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a scenario key, e.g. --set controller.warmup_rounds=1",
    )


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` overrides (values as TOML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not value or not name:
            raise SystemExit(f"offline_emo: --set wants section.key=value, got {item!r}")
        out.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
    return out


def micro_timings(threads: int, fl_model: str = "cnn-small") -> dict[str, float]:
    """Seconds for the unit operations a fleet is sized by (synthetic data, warm caches)."""
    from emo_mqtt.data import load_fashion_mnist

    torch.set_num_threads(threads)
    train, _ = load_fashion_mnist()
    data = train.subset(np.arange(1000))
    seed_everything(0)
    model = build_fl_model(fl_model)
    train_local(model, data, epochs=1, batch_size=32, lr=0.1, generator=make_generator(0))
    t0 = time.perf_counter()
    train_local(model, data, epochs=3, batch_size=32, lr=0.1, generator=make_generator(1))
    out = {"fl_epoch_per_1000_s": (time.perf_counter() - t0) / 3}
    x = torch.tensor(data.x[:32])
    y = torch.tensor(data.y[:32])
    dev_opt = torch.optim.SGD(model.trunk.parameters(), lr=0.1)
    srv_opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    t0 = time.perf_counter()
    for _ in range(50):
        acts = model.trunk(x)
        _, grad = sfl_server_step(model.head, srv_opt, acts.detach(), y)
        sfl_device_backward(acts, grad, dev_opt)
    out["sfl_batch32_compute_s"] = (time.perf_counter() - t0) / 50
    for kind in ("overlay-mlp", "overlay-cnn"):
        ov = build_overlay_model(kind, model.activation_shape)
        opt = torch.optim.Adam(ov.parameters(), lr=1e-3)
        a = np.random.default_rng(0).normal(size=(64, *model.activation_shape)).astype(np.float32)
        lab = np.arange(64) % 10
        train_overlay_steps(ov, opt, [(a, lab)] * 5)
        t0 = time.perf_counter()
        train_overlay_steps(ov, opt, [(a, lab)] * 50)
        out[f"{kind}_step64_s"] = (time.perf_counter() - t0) / 50
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.toml")
    parser.add_argument("--rounds", type=int, help="override [run] rounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=["emo_all", "emo"],
        help="EMO variants to run (emo, emo_all, emo_int8, emo_fixed)",
    )
    parser.add_argument(
        "--staleness-budget",
        type=float,
        nargs="*",
        default=[],
        help="run emo at each of these budgets (default: the scenario's)",
    )
    parser.add_argument(
        "--overlays", type=int, nargs="*", default=[], help="run every variant with N overlays"
    )
    add_set_argument(parser)
    parser.add_argument(
        "--timing", action="store_true", help="only print unit timings (1 and 2 torch threads)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    config = unshaped(load_config(args.scenario))
    if args.timing:
        for threads in (1, 2):
            timings = micro_timings(threads, config.fl.model)
            print(f"threads={threads} " + " ".join(f"{k}={v:.4f}" for k, v in timings.items()))
        return
    if args.rounds:
        config = config.with_overrides(run={"rounds": args.rounds})
    # Every device answers every round here: a deadline would only make the figures depend
    # on how loaded the machine is (a round closing early under load).
    config = config.with_overrides(fleet={"round_deadline_s": 3600.0})
    if args.set:
        config = config.with_overrides(**parse_set(args.set))
    results = sweep(config, args.seeds, args.algorithms, args.staleness_budget, args.overlays)
    print(table(results))
    versus = controller_vs_fixed(results)
    if versus:
        print("controller vs best fixed rule (means):", json.dumps(versus))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "scenario": args.scenario,
                    "config": config.to_dict(),
                    "results": results,
                    "controller_vs_fixed": versus,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
