"""Who holds which data in a run: a pure function of the scenario and its seed.

Every node computes its own share from the same configuration, so a device started on
another machine with the same scenario file trains on exactly the samples it would have
had in a one-machine run. The server holds the test set and a validation split held back
from training (to fit ensemble weights); the devices share the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emo_mqtt.config import RunConfig
from emo_mqtt.data import (
    Split,
    derive_seed,
    load_fashion_mnist,
    partition_dirichlet,
    partition_iid,
    subsample_parts,
)
from emo_mqtt.errors import ConfigError


@dataclass(frozen=True)
class DataPlan:
    """The split of one run's data between its devices and its server."""

    devices: dict[str, Split]
    validation: Split
    test: Split
    eval_subset: Split

    def device(self, device_id: str) -> Split:
        try:
            return self.devices[device_id]
        except KeyError:
            raise ConfigError(f"no device {device_id!r} in this scenario") from None


def plan_data(config: RunConfig) -> DataPlan:
    """Partition the training set across the scenario's devices (deterministic)."""
    train, test = load_fashion_mnist(config.data.data_dir or None)
    seed = config.run.seed
    rng = np.random.default_rng(derive_seed(seed, "validation-holdout"))
    order = rng.permutation(len(train))
    n_val = config.data.validation_samples
    if n_val >= len(train):
        raise ConfigError(f"data.validation_samples {n_val} leaves no training data")
    validation = train.subset(np.sort(order[:n_val]))
    pool = np.sort(order[n_val:])
    labels = train.y[pool]
    n = config.fleet.devices
    if config.data.partition == "iid":
        parts = partition_iid(labels, n, seed)
    else:
        parts = partition_dirichlet(labels, n, config.data.alpha, seed)
    if config.data.samples_per_device:
        parts = subsample_parts(parts, config.data.samples_per_device, seed)
    devices = {d: train.subset(pool[p]) for d, p in zip(config.device_ids(), parts, strict=True)}
    eval_rng = np.random.default_rng(derive_seed(seed, "eval-subset"))
    k = min(config.data.eval_samples_per_round, len(test))
    eval_subset = test.subset(np.sort(eval_rng.choice(len(test), size=k, replace=False)))
    return DataPlan(devices, validation, test, eval_subset)
