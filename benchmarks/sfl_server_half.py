"""SplitFed's server half (the overlay model): its optimiser and learning rate, on validation.

SplitFed's server half is the scenario's overlay model (726,538 parameters on the
quick-start's cut), not the FL head; the device half keeps ``sfl.lr``, SplitFed's own tuned
value. This sweep picks the server half's optimiser and learning rate for V2 (``sfl``) and
V1 (``sfl_v1``), each variant a whole fleet on the in-memory bus (the nodes ``emo run``
uses), scored on half of the server's validation split (the other half fits the
calibration, as in a run): the test set is never loaded (see offline_emo.tuning_plan).

Usage::

    python benchmarks/sfl_server_half.py                      # quickstart, the default grid
    python benchmarks/sfl_server_half.py --variants sgd:0.1 adam:0.001 --json o.json
    python benchmarks/sfl_server_half.py --scenario scenarios/paper.toml --algorithms sfl \
        --device-lr 0.02 0.05 0.1 --seeds 1 2 3 --set fleet.device_compute_speed=1.0

``--device-lr`` sweeps ``sfl.lr`` (the device half's rate) too. ``--set section.key=value``
overrides a scenario key; ``fleet.device_compute_speed=1.0`` drops the emulated slow devices'
waits, which change how long a run takes, not what it learns on the in-memory bus.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from offline_emo import add_set_argument, one, parse_set, tuning_plan, unshaped

from emo_mqtt.config import load_config
from emo_mqtt.nodes import compute


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.toml")
    parser.add_argument("--algorithms", nargs="+", default=["sfl", "sfl_v1"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["sgd:0", "sgd:0.03", "adam:0.001", "adam:0.0003"],
        help="optimizer:lr of the server half (lr 0: the same as sfl.lr)",
    )
    parser.add_argument(
        "--device-lr",
        type=float,
        nargs="*",
        default=[],
        help="sfl.lr values (default: the scenario's)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    add_set_argument(parser)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    # Unshaped: the in-memory bus carries no [network] (SplitFed learns the same either way).
    config = unshaped(load_config(args.scenario)).with_overrides(fleet={"round_deadline_s": 3600.0})
    if args.set:
        config = config.with_overrides(**parse_set(args.set))
    compute.configure(config.fleet.parallel_training)
    # results[algorithm]["sfl.lr=L server=OPT:LR"][seed]
    results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for seed in args.seeds:
        seeded = config.with_overrides(run={"seed": seed})
        plan = tuning_plan(seeded)
        for algorithm in args.algorithms:
            for device_lr in args.device_lr or [seeded.sfl.lr]:
                for variant in args.variants:
                    optimizer, lr = variant.split(":")
                    cfg = seeded.with_overrides(
                        sfl={"lr": device_lr, "server_optimizer": optimizer, "server_lr": float(lr)}
                    )
                    result = one(cfg, algorithm, plan)
                    name = f"sfl.lr={device_lr:g} server={variant}"
                    results.setdefault(algorithm, {}).setdefault(name, {})[str(seed)] = result
                    print(
                        f"seed {seed} {algorithm:7} {name:28} val acc "
                        f"{result['val_accuracy']:.4f}  {result['bytes'] / 1e6:8.1f} MB  "
                        f"{result['wall_s']:6.1f} s",
                        flush=True,
                    )
    for algorithm, by_name in results.items():
        for name, by_seed in by_name.items():
            accs = [float(r["val_accuracy"]) for r in by_seed.values()]
            print(
                f"{algorithm:7} {name:28} mean val acc {sum(accs) / len(accs):.4f}  "
                f"({' / '.join(f'{a:.4f}' for a in accs)})"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"scenario": args.scenario, "config": config.to_dict(), "results": results},
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
