"""Accuracy of fedavg, median and trimmed_mean on a scenario's data plan, with and without
one poisoning device (no MQTT: the project's own local training and RoundCollector).

Usage::

    python benchmarks/robust_aggregation.py                       # quickstart, 10 rounds
    python benchmarks/robust_aggregation.py --aggregators fedavg --attacks zeros --rounds 5

Attacks by ``--attacker`` (dev03): ``zeros`` (a zero model claiming 10**15 samples: the
weight cap of the data plan weighs it at its share) and ``scaled`` (its honest update
scaled 5x: inside the default 10x norm bound). One JSON line per (aggregator, attack):
accuracy on the per-round evaluation subset, then on the whole test set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emo_mqtt.config import load_config
from emo_mqtt.dataplan import plan_data
from emo_mqtt.fedavg import AGGREGATORS, NormReference, RoundCollector
from emo_mqtt.models import build_fl_model, load_numpy_state, state_to_numpy
from emo_mqtt.training import evaluate, make_generator, seed_everything, train_local

ROOT = Path(__file__).resolve().parents[1]
State = dict[str, np.ndarray]


def attacked(attack: str, state: State, samples: int, start: State) -> tuple[State, int]:
    """What the attacker sends instead of its honest ``state``."""
    if attack == "zeros":
        return {k: np.zeros_like(v) for k, v in state.items()}, 10**15
    if attack == "scaled":
        return {
            k: (start[k] + 5 * (v - start[k])).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in state.items()
        }, samples
    return state, samples


def run(scenario: Path, aggregator: str, attack: str, rounds: int, attacker: str) -> dict[str, Any]:
    c = load_config(scenario)
    plan = plan_data(c)
    seed_everything(c.run.seed)
    model = build_fl_model(c.fl.model)
    global_state = state_to_numpy(model)
    caps = {d: len(plan.device(d)) * c.fl.local_epochs for d in c.device_ids()}
    norms = NormReference()
    norms.observe(global_state)
    accuracy = []
    started = time.perf_counter()
    for r in range(1, rounds + 1):
        collector = RoundCollector(
            round=r,
            expected=c.device_ids(),
            min_updates=1,
            deadline_s=60.0,
            reference=global_state,
            max_norm_ratio=c.fleet.max_update_norm_ratio or None,
            max_samples=caps,
            norm_reference=norms.value,
            aggregator=aggregator,
            trim_fraction=c.fleet.trim_fraction,
        )
        for device in c.device_ids():
            local = build_fl_model(c.fl.model)
            load_numpy_state(local, global_state)
            report = train_local(
                local,
                plan.device(device),
                epochs=c.fl.local_epochs,
                batch_size=c.fl.batch_size,
                lr=c.fl.lr,
                momentum=c.fl.momentum,
                generator=make_generator(c.run.seed, "train", device, r),
            )
            state, samples = state_to_numpy(local), report.samples
            if device == attacker:
                state, samples = attacked(attack, state, samples, global_state)
            collector.add(device, state, samples, 0.0)
        global_state = collector.result().state
        norms.observe(global_state)
        load_numpy_state(model, global_state)
        accuracy.append(round(evaluate(model, plan.eval_subset).accuracy, 4))
    return {
        "aggregator": aggregator,
        "attack": attack,
        "rounds": rounds,
        "eval_accuracy_per_round": accuracy,
        "test_accuracy": round(evaluate(model, plan.test).accuracy, 4),
        "rejected": collector.rejected,
        "capped": collector.capped,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "quickstart.toml")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
    p.add_argument(
        "--attacks",
        nargs="+",
        default=["none", "zeros", "scaled"],
        choices=["none", "zeros", "scaled"],
    )
    p.add_argument("--attacker", default="dev03")
    args = p.parse_args()
    torch.set_num_threads(1)
    for attack in args.attacks:
        for aggregator in args.aggregators:
            print(
                json.dumps(run(args.scenario, aggregator, attack, args.rounds, args.attacker)),
                flush=True,
            )


if __name__ == "__main__":
    main()
