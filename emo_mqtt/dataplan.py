"""Who holds which data in a run: a pure function of the scenario and its seed.

Every node computes its own share from the same configuration, so a device started on
another machine with the same scenario file trains on exactly the samples it would have
had in a one-machine run. The server holds the test set and a validation split held back
from training (to fit ensemble weights); the devices share the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from emo_mqtt.cifar import load_cifar10
from emo_mqtt.config import DataSection, RunConfig
from emo_mqtt.data import Split, load_fashion_mnist
from emo_mqtt.errors import ConfigError
from emo_mqtt.partition import (
    draw_sizes,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    resize_parts,
    subsample_parts,
)
from emo_mqtt.seeds import derive_seed


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


def load_dataset(data: DataSection) -> tuple[Split, Split]:
    """``(train, test)`` of the scenario's dataset, from ``data.data_dir`` or its default."""
    if data.dataset == "cifar10":
        return load_cifar10(data.data_dir or None)
    return load_fashion_mnist(data.data_dir or None)


def device_indices(
    config: RunConfig, labels: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Indices into the training set: the server's validation split and each device's share.

    ``labels`` are the whole training set's. Raises :class:`ConfigError` naming the numbers
    when the training pool cannot give every device ``data.min_samples_per_device``.
    """
    data, seed, n = config.data, config.run.seed, config.fleet.devices
    rng = np.random.default_rng(derive_seed(seed, "validation-holdout"))
    order = rng.permutation(labels.shape[0])
    n_val = data.validation_samples
    if n_val >= labels.shape[0]:
        raise ConfigError(
            f"data.validation_samples {n_val} leaves no training data "
            f"({data.dataset} holds {labels.shape[0]} training samples)"
        )
    pool = np.sort(order[n_val:])
    minimum = data.min_samples_per_device
    if pool.size < n * minimum:
        raise ConfigError(
            f"fleet too large for the data: fleet.devices {n} x data.min_samples_per_device "
            f"{minimum} needs {n * minimum} training samples, but only {pool.size} are "
            f"available ({labels.shape[0]} in {data.dataset} minus data.validation_samples "
            f"{n_val}); use fewer devices or a lower minimum"
        )
    pool_labels = labels[pool]
    if data.partition == "iid":
        parts = partition_iid(pool_labels, n, seed)
    elif data.partition == "shards":
        parts = partition_shards(pool_labels, n, data.shards_per_device, seed, minimum)
    else:
        parts = partition_dirichlet(pool_labels, n, data.alpha, seed, min_size=minimum)
    if data.size_skew != "none":
        # samples_per_device is then the mean: the fleet uses n x samples_per_device samples
        # (at most the pool), shared by skewed per-device counts.
        used = min(pool.size, n * data.samples_per_device) if data.samples_per_device else pool.size
        spread = data.size_sigma if data.size_skew == "lognormal" else data.size_exponent
        sizes = draw_sizes(n, used, data.size_skew, spread, seed, minimum)
        parts = resize_parts(pool_labels, parts, sizes, seed)
    elif data.samples_per_device:
        parts = subsample_parts(parts, data.samples_per_device, seed)
    shares = {d: pool[p] for d, p in zip(config.device_ids(), parts, strict=True)}
    return np.sort(order[:n_val]), shares


def plan_data(config: RunConfig, only: Iterable[str] | None = None) -> DataPlan:
    """Partition the training set across the scenario's devices (deterministic).

    ``only``: materialise these devices' data and no other's (a worker process of
    ``emo run --workers`` holds a share of the fleet); the partition is the same.
    """
    train, test = load_dataset(config.data)
    validation_idx, shares = device_indices(config, train.y)
    wanted = None if only is None else set(only)
    devices = {d: train.subset(idx) for d, idx in shares.items() if wanted is None or d in wanted}
    eval_rng = np.random.default_rng(derive_seed(config.run.seed, "eval-subset"))
    k = min(config.data.eval_samples_per_round, len(test))
    eval_subset = test.subset(np.sort(eval_rng.choice(len(test), size=k, replace=False)))
    return DataPlan(devices, train.subset(validation_idx), test, eval_subset)
