"""Fair baselines and true labels (issue 13): SplitFed's large server half, parameter counts,
FL calibrated as the ensemble is, and ``emo_all`` sending every activation exactly once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import torch

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.bus import MemoryBroker
from emo_mqtt.cache import ActivationBatch, DeviceOutbox
from emo_mqtt.config import from_dict
from emo_mqtt.controller import ControlDecision
from emo_mqtt.dataplan import plan_data
from emo_mqtt.errors import EmoError
from emo_mqtt.fleet import comparisons, params_of, run_algorithm
from emo_mqtt.models import (
    OverlayModel,
    build_fl_model,
    build_overlay_model,
    build_split_model,
    param_count,
    state_to_numpy,
)
from emo_mqtt.strategies.device import ActivationCapture, capture_start, outbox_bound
from emo_mqtt.strategies.server import ServerStrategy, calibrated_accuracy
from emo_mqtt.training import evaluate, make_generator, make_rng, train_local

SMALL: dict[str, Any] = {
    "run": {"name": "base", "rounds": 2},
    "data": {"samples_per_device": 150, "validation_samples": 300, "eval_samples_per_round": 300},
    "fleet": {"devices": 3, "overlays": 1, "min_updates": 3, "round_deadline_s": 30},
    "fl": {"local_epochs": 2, "lr": 0.1},
    "emo": {"overlay_steps_per_round": 5, "cache_entries": 1000},
}


def test_split_model_is_the_trunk_under_the_overlay_model() -> None:
    torch.manual_seed(5)
    fl = build_fl_model("cnn-small")
    torch.manual_seed(5)
    split = build_split_model("cnn-small", "overlay-mlp")
    assert isinstance(split.head, OverlayModel)
    # The device half starts where FL's trunk starts for the same seed.
    for k, v in state_to_numpy(fl.trunk).items():
        assert v.tobytes() == state_to_numpy(split.trunk)[k].tobytes()
    assert param_count(split.head) == 726_538
    x = torch.zeros(4, 1, 28, 28)
    assert split(x).shape == (4, 10)


def test_params_by_algorithm() -> None:
    config = from_dict(SMALL)
    fl = build_fl_model(config.fl.model)
    ov = param_count(build_overlay_model(config.emo.overlay_model, fl.activation_shape))
    assert params_of(config, "fl") == {"device": param_count(fl), "server": 0, "overlay": 0}
    for sfl in ("sfl", "sfl_v1"):
        assert params_of(config, sfl) == {
            "device": param_count(fl.trunk),
            "server": ov,
            "overlay": 0,
        }
    for emo in ("emo", "emo_all"):
        assert params_of(config, emo) == {"device": param_count(fl), "server": 0, "overlay": ov}


@pytest.mark.parametrize("algorithm", [Algorithm.SFL, Algorithm.SFL_V1])
def test_splitfed_server_trains_the_overlay_model(algorithm: Algorithm) -> None:
    config = from_dict({**SMALL, "sfl": {"server_optimizer": "adam", "server_lr": 0.001}})
    s = ServerStrategy(config, algorithm, plan_data(config))
    s.start_round(1, 0.0)
    assert s.split is not None
    for head in s.split.heads.values():
        assert isinstance(head, OverlayModel)
        assert head is not s.model.head  # a working copy, merged at the end of the round
    assert all(isinstance(o, torch.optim.Adam) for o in s.split.optimizers.values())


def test_fl_calibration_is_fitted_on_validation_and_scored_on_the_split() -> None:
    """A head whose prior is skewed towards one class: calibration (temperature and class
    bias fitted on validation) recovers what the skew costs; raw accuracy shows it."""
    config = from_dict(SMALL)
    plan = plan_data(config)
    torch.manual_seed(1)
    model = build_fl_model(config.fl.model)
    train_local(
        model,
        plan.device("dev00"),
        epochs=3,
        batch_size=32,
        lr=0.1,
        generator=make_generator(1, "t"),
    )
    with torch.no_grad():
        model.head[-1].bias[3] += 8.0  # type: ignore[index]
    raw = evaluate(model, plan.eval_subset).accuracy
    calibrated = calibrated_accuracy(model, plan.validation, plan.eval_subset)
    assert calibrated > raw + 0.1
    assert comparisons(
        {
            "fl": {"accuracy": raw, "calibrated_accuracy": calibrated, "fl_model_sha256": "a"},
            "emo": {"accuracy": 0.8, "fl_model_sha256": "a"},
        }
    )["emo_minus_fl_calibrated_points"] == round(100 * (0.8 - calibrated), 2)


def test_emo_all_captures_every_sample_once_and_evicts_nothing() -> None:
    """1,000 samples, two local epochs, fp32: the last epoch only, the outbox holds it all."""
    config = from_dict({**SMALL, "data": {**SMALL["data"], "samples_per_device": 1000}})
    data = plan_data(config).device("dev00")
    n = len(data)
    model = build_fl_model(config.fl.model)
    shape = tuple(model.activation_shape)
    bound = outbox_bound(config, Algorithm.EMO_ALL, n, shape)
    # The configured 4 MiB would not hold one round at fp32: it is what evicted before.
    assert bound > config.emo.outbox_kib * 1024
    assert outbox_bound(config, Algorithm.EMO, n, shape) == config.emo.outbox_kib * 1024
    outbox: DeviceOutbox[ActivationBatch] = DeviceOutbox(bound)
    capture = ActivationCapture(
        1,
        ControlDecision(1.0, "fp32", 1, "send-everything"),
        make_rng(1, "activations"),
        outbox,
        first_step=capture_start(n, 32, 2),
    )
    train_local(
        model,
        data,
        epochs=2,
        batch_size=32,
        lr=0.1,
        generator=make_generator(1, "x"),
        on_activations=capture,
    )
    batches = outbox.pop_all()
    ids = np.concatenate([b.sample_ids for b in batches])
    assert capture.captured == n == len(ids)
    assert sorted(ids.tolist()) == list(range(n))  # every sample, once
    assert outbox.stats.evicted == outbox.stats.dropped == 0
    assert all(b.precision == "fp32" for b in batches)


def test_emo_all_fleet_publishes_every_capture() -> None:
    """Through the device and overlay nodes on the in-memory bus: captured == published ==
    every sample of every round, none evicted, none repeated; time to final after sim time."""
    config = from_dict(SMALL)
    plan = plan_data(config)
    summary = asyncio.run(
        run_algorithm(MemoryBroker(), config, "emo_all", plan, say=lambda _: None)
    )
    act = summary["activations"]
    every = sum(len(plan.device(d)) for d in config.device_ids()) * config.run.rounds
    assert act == {
        "captured": every,
        "published": every,
        "evicted": 0,
        "dropped": 0,
        "duplicates": 0,
    }
    assert summary["bytes_by_kind"]["activations"] >= every * 1152 * 4
    assert summary["time_to_final_s"] >= summary["sim_time_s"]
    assert summary["calibrated_accuracy"] == summary["accuracy"]
    assert 0.1 < summary["fl_calibrated_accuracy"] <= 1.0


def test_splitfed_fleet_trains_the_large_model() -> None:
    config = from_dict(SMALL)
    plan = plan_data(config)
    summary = asyncio.run(run_algorithm(MemoryBroker(), config, "sfl", plan, say=lambda _: None))
    assert summary["params"]["server"] == 726_538
    assert summary["accuracy"] == summary["fl_accuracy"] > 0.2
    assert summary["activations"]["captured"] == 0


def test_a_diverging_splitfed_run_fails_fast_and_says_why() -> None:
    """sfl.lr far too high: the server half's loss goes non-finite within a few batches and
    the run fails naming the cause, well before one gradient timeout (the old behaviour:
    devices refused the NaN gradients and stalled gradient_timeout_s per batch)."""
    raw = {**SMALL, "sfl": {"lr": 1e30, "gradient_timeout_s": 120}}
    config = from_dict(raw)
    plan = plan_data(config)
    started = time.monotonic()
    with pytest.raises(EmoError, match="SplitFed diverged"):
        asyncio.run(run_algorithm(MemoryBroker(), config, "sfl", plan, say=lambda _: None))
    assert time.monotonic() - started < 60


def test_a_small_outbox_evicts_and_the_counts_say_so() -> None:
    """The controlled emo keeps emo.outbox_kib: 64 KiB cannot hold a round of 150 samples
    even at int8, so the outbox evicts, and captured = published + evicted + dropped."""
    config = from_dict({**SMALL, "emo": {**SMALL["emo"], "outbox_kib": 64}})
    plan = plan_data(config)
    summary = asyncio.run(run_algorithm(MemoryBroker(), config, "emo", plan, say=lambda _: None))
    act = summary["activations"]
    assert act["evicted"] > 0 and act["published"] > 0 and act["duplicates"] == 0
    assert act["captured"] == act["published"] + act["evicted"] + act["dropped"]


def test_fixed_rules_outbox_holds_a_whole_round_at_their_rate() -> None:
    """emo_int8 and emo_fixed name a rule: their outbox must hold what the rule captures in
    a round (at 20,000 samples, more than the configured 4 MiB), or evictions would make
    them a different, cheaper rule than the one the ablation claims."""
    config = from_dict(SMALL)
    shape = (8, 8, 8)
    n = 20_000
    configured = config.emo.outbox_kib * 1024
    int8 = outbox_bound(config, Algorithm.EMO_INT8, n, shape)
    fixed = outbox_bound(config, Algorithm.EMO_FIXED, n, shape)
    assert int8 >= n * 512 > configured
    share, width = config.controller.fixed_share, {"fp32": 4, "fp16": 2, "int8": 1}
    assert fixed >= int(n * share) * 512 * width[config.controller.fixed_precision]
    # A small round still gets at least the configured bound.
    assert outbox_bound(config, Algorithm.EMO_INT8, 10, shape) == configured
