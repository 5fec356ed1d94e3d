"""The strategies alone: no broker, no bus, no event loop; time is a number we pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.config import RunConfig, from_dict
from emo_mqtt.dataplan import DataPlan, plan_data
from emo_mqtt.errors import ConfigError, TrainingDiverged
from emo_mqtt.fedavg import RoundResult
from emo_mqtt.messages import (
    Activations,
    Control,
    Done,
    MessageError,
    OverlayModelMsg,
    RoundAnnouncement,
    SflActivations,
    SflGradients,
    Update,
)
from emo_mqtt.models import build_fl_model, load_numpy_state, state_to_numpy
from emo_mqtt.nodes.limits import limits_for
from emo_mqtt.strategies.base import RoundState
from emo_mqtt.strategies.device import DeviceStrategy, RoundAction, SplitClient
from emo_mqtt.strategies.overlay import OverlayStrategy
from emo_mqtt.strategies.server import OverlayPool, ServerStrategy, evaluate
from emo_mqtt.topics import Kind
from emo_mqtt.training import make_generator, train_local

RAW: dict[str, Any] = {
    "run": {"name": "pure", "rounds": 2},
    "data": {"samples_per_device": 64, "validation_samples": 200, "eval_samples_per_round": 200},
    "fleet": {"devices": 3, "overlays": 1, "min_updates": 2, "round_deadline_s": 10},
    "fl": {"batch_size": 16},
    "emo": {"overlay_steps_per_round": 3, "overlay_batch_size": 16, "cache_entries": 500},
}


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return from_dict(RAW)


@pytest.fixture(scope="module")
def plan(config: RunConfig) -> DataPlan:
    return plan_data(config)


def trained_update(
    config: RunConfig, plan: DataPlan, device: str, announced: RoundAnnouncement
) -> Update:
    model = build_fl_model(config.fl.model)
    load_numpy_state(model, announced.weights)
    report = train_local(
        model,
        plan.device(device),
        epochs=1,
        batch_size=16,
        lr=0.05,
        generator=make_generator(1, "train", device, announced.round),
    )
    return Update(announced.round, state_to_numpy(model), report.samples, report.loss)


def test_algorithm_properties() -> None:
    assert [a for a in Algorithm if a.uses_overlays] == [
        Algorithm.EMO,
        Algorithm.EMO_ALL,
        Algorithm.EMO_INT8,
        Algorithm.EMO_FIXED,
    ]
    assert [a for a in Algorithm if a.is_split] == [Algorithm.SFL, Algorithm.SFL_V1]
    assert Algorithm.SFL_V1.head_per_device and not Algorithm.SFL.head_per_device
    assert Algorithm.EMO.controlled and not Algorithm.EMO_ALL.controlled
    with pytest.raises(ConfigError, match="fl, sfl"):
        Algorithm.parse("flower")


@pytest.mark.parametrize("algorithm", [Algorithm.FL, Algorithm.EMO, Algorithm.EMO_ALL])
def test_fedavg_round(config: RunConfig, plan: DataPlan, algorithm: Algorithm) -> None:
    s = ServerStrategy(config, algorithm, plan)
    out = s.start_round(1, now=0.0)
    assert s.state is RoundState.COLLECTING
    kinds = [o.kind for o in out]
    # EMO: one retained control decision per sampled device, before the round announcement.
    controls = 3 if algorithm.uses_overlays else 0
    assert kinds == [Kind.CONTROL] * controls + [Kind.SERVER_ROUND]
    assert all(isinstance(o.message, Control) for o in out[:controls])
    announced = out[-1].message
    assert isinstance(announced, RoundAnnouncement) and announced.sampled == (
        "dev00",
        "dev01",
        "dev02",
    )
    for device in ("dev00", "dev01"):
        assert (
            s.on_update(device, device, trained_update(config, plan, device, announced), now=1.0)
            is None
        )
    update = trained_update(config, plan, "dev02", announced)
    refused = s.on_update("dev02", "dev01", update, now=1.0)
    assert refused is not None and refused[0] == "late_update"  # not its own
    refused = s.on_update("dev00", "dev00", update, now=1.0)
    assert refused is not None and refused[0] == "duplicate_update"
    assert not s.ready(now=5.0) and s.ready(now=10.0)  # two of three: at the deadline
    assert s.collector is not None
    closed = s.close_round(s.collector.result())
    # RoundState(...): mypy still holds s.state to the COLLECTING asserted above.
    assert RoundState(s.state) is RoundState.CLOSED and closed.aggregated
    assert set(closed.contributors) == {"dev00", "dev01"}
    scores = evaluate(s.model, plan, False, s.ensemble(), s.overlay_rounds())
    record = s.record_round(closed, scores, wall_s=1.5)
    assert record["missing"] == ["dev02"] and record["updates"] == 2
    refused = s.on_update("dev02", "dev02", update, now=11.0)
    assert refused is not None and refused[0] == "late_update"
    state, done = s.finish({"rounds": 1})
    assert (
        isinstance(done.message, Done)
        and done.retain
        and RoundState(s.state) is RoundState.FINISHED
    )
    assert state.keys() == state_to_numpy(s.model).keys()


def test_fl_is_the_same_under_emo(config: RunConfig, plan: DataPlan) -> None:
    """The same updates give the same global model whatever the algorithm adds."""
    digests = []
    for algorithm in (Algorithm.FL, Algorithm.EMO):
        s = ServerStrategy(config, algorithm, plan)
        announced = s.start_round(1, 0.0)[-1].message
        for device in announced.sampled:
            s.on_update(device, device, trained_update(config, plan, device, announced), 1.0)
        assert s.collector is not None
        s.close_round(s.collector.result())
        digests.append([v.tobytes() for v in state_to_numpy(s.model).values()])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("algorithm", [Algorithm.SFL, Algorithm.SFL_V1])
def test_splitfed_round(config: RunConfig, plan: DataPlan, algorithm: Algorithm) -> None:
    s = ServerStrategy(config, algorithm, plan)
    announced = s.start_round(1, 0.0)[-1].message
    assert isinstance(announced, RoundAnnouncement)
    assert s.split is not None
    assert sorted(s.split.heads) == (
        ["dev00", "dev01", "dev02"] if algorithm.head_per_device else ["shared"]
    )
    head_before = state_to_numpy(s.model.head)
    limits = limits_for(config, algorithm, plan)
    for device in announced.sampled:
        client = SplitClient(config, plan.device(device), 1, announced.weights, device)
        for batch, idx in enumerate(client.batches()):
            sent = client.forward(batch, idx)
            # Through validation, as the server's node does it.
            received = SflActivations.from_body(sent.to_body(), limits=limits)
            reply = s.on_sfl_activations(device, received)
            assert not isinstance(reply, str)
            grad = reply[0].message
            assert isinstance(grad, SflGradients) and reply[0].node == device
            client.backward(torch.as_tensor(grad.gradient))
        trunk, samples, loss = client.update()
        msg = Update(1, state_to_numpy(trunk), samples, loss)
        assert (
            s.on_update(
                device, device, Update.from_body(msg.to_body(), limits=limits, sender=device), 1.0
            )
            is None
        )
    assert s.ready(1.0) and s.collector is not None
    s.close_round(s.collector.result())
    head_after = state_to_numpy(s.model.head)
    assert any(not np.array_equal(v, head_before[k]) for k, v in head_after.items())
    late = SflActivations(
        1, 0, np.zeros((1, *s.model.activation_shape), np.float32), np.zeros(1, np.int64)
    )
    assert isinstance(s.on_sfl_activations("dev00", late), str)


def test_splitfed_divergence_ends_the_run_instead_of_sending_nan(
    config: RunConfig, plan: DataPlan
) -> None:
    """A server half whose weights blew up gives a non-finite loss and gradient: the strategy
    raises TrainingDiverged (which names the lr to lower) instead of returning a gradient
    every device refuses, which left each device waiting out its gradient timeout."""
    s = ServerStrategy(config, Algorithm.SFL, plan)
    announced = s.start_round(1, 0.0)[-1].message
    assert isinstance(announced, RoundAnnouncement) and s.split is not None
    with torch.no_grad():
        for head in s.split.heads.values():
            for param in head.parameters():
                param.fill_(float("inf"))
    device = announced.sampled[0]
    client = SplitClient(config, plan.device(device), 1, announced.weights, device)
    batch = client.forward(0, next(iter(client.batches())))
    with pytest.raises(TrainingDiverged, match=r"round 1, batch 0; lower sfl.lr"):
        s.on_sfl_activations(device, batch)
    assert not s.split.losses  # nothing non-finite entered the round's losses


@pytest.mark.parametrize("algorithm", [Algorithm.SFL, Algorithm.SFL_V1])
def test_a_non_finite_batch_on_a_sound_head_is_the_batch_s_fault(
    config: RunConfig, plan: DataPlan, algorithm: Algorithm
) -> None:
    """Finite but huge activations (what one hostile device can send past validation) give
    a non-finite loss: the batch is refused as ``non_finite``, the head is not stepped, and
    the run goes on; only a head that fails on validation images means divergence."""
    s = ServerStrategy(config, algorithm, plan)
    announced = s.start_round(1, 0.0)[-1].message
    assert isinstance(announced, RoundAnnouncement) and s.split is not None
    device = announced.sampled[0]
    key = s.split.policy.key_for(device)
    before = state_to_numpy(s.split.heads[key])
    shape = (4, *s.model.activation_shape)
    huge = np.where(np.arange(np.prod(shape)).reshape(shape) % 2 == 0, 3e38, -3e38)
    bad = SflActivations(1, 0, huge.astype(np.float32), np.zeros(4, np.int64))
    with pytest.raises(MessageError) as refused:
        s.on_sfl_activations(device, bad)
    assert refused.value.reason == "non_finite"
    after = state_to_numpy(s.split.heads[key])
    assert all(np.array_equal(v, after[k]) for k, v in before.items())
    client = SplitClient(config, plan.device(device), 1, announced.weights, device)
    reply = s.on_sfl_activations(device, client.forward(0, next(iter(client.batches()))))
    assert not isinstance(reply, str)
    grad = reply[0].message
    assert isinstance(grad, SflGradients) and bool(np.isfinite(np.asarray(grad.gradient)).all())


def test_splitfed_device_divergence_is_caught_before_sending(
    config: RunConfig, plan: DataPlan
) -> None:
    """A device trunk that blew up raises TrainingDiverged at forward, naming the device and
    the lr, instead of sending activations the server refuses (the device then waited out
    its gradient timeout)."""
    s = ServerStrategy(config, Algorithm.SFL, plan)
    announced = s.start_round(1, 0.0)[-1].message
    assert isinstance(announced, RoundAnnouncement)
    device = announced.sampled[0]
    weights = {k: np.full_like(v, np.inf) for k, v in announced.weights.items()}
    client = SplitClient(config, plan.device(device), 1, weights, device)
    with pytest.raises(TrainingDiverged, match=rf"{device}'s trunk .* round 1, batch 0; lower"):
        client.forward(0, next(iter(client.batches())))
    sound = SplitClient(config, plan.device(device), 1, announced.weights, device)
    assert sound.forward(0, next(iter(sound.batches()))).activations.shape[0] > 0


def test_server_passes_caps_norm_reference_and_aggregator(
    config: RunConfig, plan: DataPlan
) -> None:
    """Issue 11, item 2: the collector gets the data plan's caps, the robust norm reference
    and the scenario's aggregator; a zeroed round moves neither the reference nor the bound."""
    from dataclasses import replace

    s = ServerStrategy(config, Algorithm.FL, plan)
    announced = s.start_round(1, 0.0)[-1].message
    collector = s.collector
    assert collector is not None and collector.aggregator == "fedavg"
    assert collector.max_samples == {d: len(plan.device(d)) for d in config.device_ids()}
    initial = s.norm_reference.value
    assert initial is not None and collector.norm_reference == initial
    # A device claiming more than its share is weighed at its share (the node's validation
    # refuses such a claim first; the cap is the second line).
    update = trained_update(config, plan, "dev00", announced)
    assert s.on_update("dev00", "dev00", replace(update, samples=10**15), 1.0) is None
    assert collector.capped == {"dev00": (10**15, 64)}
    # A zeroed global model (a poisoned round) is one of the median's values, not all: an
    # honest update (about the initial model's norm away from zero) is still admitted.
    zeros = {k: np.zeros_like(v) for k, v in s.device_side_state().items()}
    s.close_round(RoundResult(zeros, [], 0))
    s.start_round(2, 10.0)
    assert s.norm_reference.value == pytest.approx(initial / 2)  # median of (initial, 0)
    assert s.on_update("dev00", "dev00", replace(update, round=2), 11.0) is None
    s.close_round(None)  # closed unaggregated: the reference does not move
    assert s.norm_reference.norms == pytest.approx([initial, 0.0])
    s.start_round(3, 20.0)
    s.close_round(RoundResult(update.weights, [], 0))
    # The reference survives a checkpoint.
    # The reference survives a checkpoint.
    arrays, meta = s.checkpoint("run", 3)
    t = ServerStrategy(config, Algorithm.FL, plan)
    t.restore(arrays, meta)
    assert t.norm_reference.norms == s.norm_reference.norms
    # The scenario's aggregator reaches the collector and SplitFed V1's head merge.
    robust = replace(config, fleet=replace(config.fleet, aggregator="trimmed_mean"))
    s = ServerStrategy(robust, Algorithm.SFL_V1, plan)
    s.start_round(1, 0.0)
    assert s.collector is not None and s.collector.aggregator == "trimmed_mean"
    assert s.split is not None and getattr(s.split.policy, "aggregator", None) == "trimmed_mean"


def test_device_strategy(config: RunConfig) -> None:
    d = DeviceStrategy(config, Algorithm.EMO, "dev01")
    weights: dict[str, np.ndarray] = {}
    assert d.on_round(RoundAnnouncement(1, "emo", ("dev00",), 10, weights)) is RoundAction.IGNORE
    assert d.on_round(RoundAnnouncement(2, "emo", ("dev01",), 10, weights)) is RoundAction.TRAIN
    assert d.on_round(RoundAnnouncement(2, "emo", ("dev01",), 10, weights)) is RoundAction.IGNORE
    d.update(2, build_fl_model(config.fl.model), 10, 0.5)
    # The same round announced anew (a restarted server): the update goes again.
    assert d.on_round(RoundAnnouncement(2, "emo", ("dev01",), 10, weights)) is RoundAction.RESEND
    assert d.decision_for(3) is None  # not decided yet: wait for it
    from emo_mqtt.controller import ControlDecision

    assert d.on_control(Control(3, ControlDecision(0.5, "fp16", 1, "x")))
    assert not d.on_control(Control(2, ControlDecision(1.0, "fp32", 1, "older")))
    decision = d.decision_for(3)
    assert decision is not None and decision.fraction == 0.5
    every = DeviceStrategy(config, Algorithm.EMO_ALL, "dev01").decision_for(9)
    assert every is not None and every.reason == "send-everything"


def test_overlay_strategy(config: RunConfig) -> None:
    o = OverlayStrategy(config, "ovl0", spill=None)
    limits = limits_for(config, Algorithm.EMO)
    assert o.on_round(RoundAnnouncement(1, "emo", ("dev00", "dev01", "dev02"), 10, {}), now=0.0)
    assert o.ready_round(now=1.0) is None
    shape = o.cache.activation_shape
    for device in o.devices:
        msg = Activations(
            1, np.arange(20), np.arange(20) % 10, np.ones((20, *shape), np.float32), None, True
        )
        o.store(device, msg)
        o.stored(device, msg)
    assert o.ready_round(now=1.0) == 1
    batches = o.replay_batches(1)
    assert len(batches) == 3
    model = o.trained(1, 0.7)
    assert model is not None and model.version == 1 and o.trained_round == 1
    # What it publishes passes the server's validation (fp16 through the codec).
    from emo_mqtt.codec import decode, encode

    body = decode(encode(model.to_body(), kind=model.KIND)).body
    assert OverlayModelMsg.from_body(body, limits=limits).version == 1
    o.on_done(Done(1, {}, "finished"))
    assert o.finished


def test_final_evaluation_waits_only_for_overlays_that_had_work() -> None:
    """Sparse sampling (the 1,000-device fleet: 5 % a round, 10 overlays) leaves overlays
    whose devices were never sampled: they publish no model, and the server must not hold
    the run a whole round deadline for them. Overlays served within the replay window are
    still awaited; a server that served nothing yet (resumed) awaits all."""
    cfg = from_dict(
        {
            **RAW,
            "run": {"name": "pure", "rounds": 6},
            "fleet": {**RAW["fleet"], "devices": 6, "overlays": 3},
            "emo": {**RAW["emo"], "max_staleness": 1},
        }
    )
    pool = OverlayPool(cfg, (8, 4, 4))
    assert pool.awaited(6) == {"ovl0", "ovl1", "ovl2"}  # nothing served yet: all of them
    pool.serve(1, [d for d in cfg.device_ids() if cfg.overlay_of(d) == "ovl2"])
    pool.serve(5, [d for d in cfg.device_ids() if cfg.overlay_of(d) == "ovl0"])
    pool.serve(6, [])
    # ovl0 served in round 5 (within 1 round of 6); ovl2 only in round 1; ovl1 never.
    assert pool.awaited(6) == {"ovl0"}
    assert not pool.up_to_date(6)
    pool.models["ovl0"] = {"model": None, "round": 6, "version": 1, "loss": 0.1}
    assert pool.up_to_date(6)
    fleet_wide = OverlayPool(cfg.with_overrides(emo={"replay_scope": "fleet"}), (8, 4, 4))
    fleet_wide.serve(5, [cfg.device_ids()[0]])
    assert fleet_wide.awaited(6) == {"ovl0", "ovl1", "ovl2"}
