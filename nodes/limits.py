"""What a node of a run accepts: the :class:`~emo_mqtt.messages.Limits` of its messages.

Built once per node from the scenario (and, on the server, the data plan): model state keys,
shapes and dtypes, the activation shape, the number of classes, sample and batch bounds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.config import RunConfig
from emo_mqtt.dataplan import DataPlan
from emo_mqtt.messages import Limits, state_spec
from emo_mqtt.models import build_fl_model, build_overlay_model, state_to_numpy

#: Limits without a plan (devices, overlays) by what they depend on: a fleet of thousands
#: of devices builds them once, not once per device (two reference models each: seconds).
_SHARED: dict[tuple[Any, ...], Limits] = {}


def limits_for(config: RunConfig, algorithm: Algorithm, plan: DataPlan | None = None) -> Limits:
    """The limits of one node of ``algorithm``'s fleet; ``plan``: the devices' data shares.

    The reference models are built under a forked RNG: building them must not move the
    global torch RNG the nodes' own models are initialised from (FL is bit-identical).
    Without ``plan``, one (immutable) :class:`Limits` is shared by the nodes of a fleet.
    """
    if plan is not None:
        return _limits(config, algorithm, plan)
    key = (
        config.fl,
        config.emo.overlay_model,
        config.data.samples_per_device,
        config.fleet.devices,
        algorithm,
    )
    if key not in _SHARED:
        if len(_SHARED) >= 16:  # a long-lived process running many scenarios
            _SHARED.clear()
        _SHARED[key] = _limits(config, algorithm, None)
    return _SHARED[key]


def _limits(config: RunConfig, algorithm: Algorithm, plan: DataPlan | None) -> Limits:
    with torch.random.fork_rng(devices=[]):
        fl = build_fl_model(config.fl.model)
        overlay = build_overlay_model(config.emo.overlay_model, fl.activation_shape, fl.num_classes)
    full = state_spec(state_to_numpy(fl))
    device_side = state_spec(state_to_numpy(fl.trunk)) if algorithm.is_split else full
    epochs, batch = config.fl.local_epochs, config.fl.batch_size
    per_device = config.data.samples_per_device or None
    max_samples: dict[str, int] = {}
    max_batches = None
    if plan is not None:
        sizes = {d: len(split) for d, split in plan.devices.items()}
        max_samples = {d: n * epochs for d, n in sizes.items()}
        largest = max(sizes.values(), default=0)
        per_device = largest
        max_batches = max(1, math.ceil(largest / batch) * epochs)
    elif per_device is not None:
        max_batches = max(1, math.ceil(per_device / batch) * epochs)
    return Limits(
        round_weights=device_side,
        # SplitFed's done message carries the device half: the server half (the large model)
        # never leaves the server, and would not fit one retained message.
        done_weights=device_side,
        overlay_weights=state_spec(state_to_numpy(overlay)),
        activation_shape=tuple(fl.activation_shape),
        num_classes=fl.num_classes,
        max_samples=max_samples,
        default_max_samples=None if per_device is None else per_device * epochs,
        max_sample_id=per_device,
        max_batch=max_batches,
        max_batch_size=batch,
        node_ids=frozenset(config.device_ids()),
    )
