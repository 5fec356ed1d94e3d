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
"""

from __future__ import annotations

import argparse
import json

from offline_emo import one, tuning_plan

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
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    config = load_config(args.scenario).with_overrides(
        run={"seed": args.seed}, fleet={"round_deadline_s": 3600.0}
    )
    compute.configure(config.fleet.parallel_training)
    plan = tuning_plan(config)
    results: dict[str, dict[str, object]] = {}
    for algorithm in args.algorithms:
        for variant in args.variants:
            optimizer, lr = variant.split(":")
            cfg = config.with_overrides(sfl={"server_optimizer": optimizer, "server_lr": float(lr)})
            result = one(cfg, algorithm, plan)
            results.setdefault(algorithm, {})[variant] = result
            print(
                f"{algorithm:7} server half {variant:12} val acc {result['val_accuracy']:.4f}  "
                f"{result['bytes'] / 1e6:8.1f} MB  {result['wall_s']:6.1f} s",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"scenario": args.scenario, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
