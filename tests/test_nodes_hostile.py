"""Whole fleets of every algorithm on the in-memory bus, clean and under hostile input.

A rogue client holding one device's identity publishes what a buggy or malicious device
could (issue 11): rounds of ``inf`` and ``2**63``, wrong shapes, labels out of range, NaN
models, frames of the wrong kind, JSON nested thousands deep. Every one must be refused and
counted by kind and reason, the run must finish, and the FL model must be bit-identical to
the clean run's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.bus import MemoryBroker, open_bus
from emo_mqtt.codec import decode, encode
from emo_mqtt.config import RunConfig, from_dict
from emo_mqtt.dataplan import DataPlan, plan_data
from emo_mqtt.ensemble import Ensemble
from emo_mqtt.fleet import run_algorithm, run_id
from emo_mqtt.nodes.limits import limits_for
from emo_mqtt.topics import Kind, topic

RAW: dict[str, Any] = {
    "run": {"name": "hostile", "rounds": 2},
    "data": {"samples_per_device": 120, "validation_samples": 300, "eval_samples_per_round": 300},
    "fleet": {"devices": 3, "overlays": 1, "min_updates": 3, "round_deadline_s": 60},
    "emo": {"overlay_steps_per_round": 4, "cache_entries": 1000},
}


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return from_dict(RAW)


@pytest.fixture(scope="module")
def plan(config: RunConfig) -> DataPlan:
    return plan_data(config)


def run(
    config: RunConfig, algorithm: str, plan: DataPlan, broker: MemoryBroker, out: Path | None = None
) -> dict[str, Any]:
    return asyncio.run(
        run_algorithm(broker, config, algorithm, plan, out_dir=out, say=lambda _: None)
    )


@pytest.fixture(scope="module")
def clean(config: RunConfig, plan: DataPlan) -> dict[str, dict[str, Any]]:
    """Every algorithm once, undisturbed."""
    return {a.value: run(config, a.value, plan, MemoryBroker()) for a in Algorithm}


def test_every_algorithm_runs_on_the_memory_bus(clean: dict[str, dict[str, Any]]) -> None:
    for name, entry in clean.items():
        assert entry["rounds"] == 2, name
        assert entry["rejected"] == {}, (name, entry["rejected"])
        assert entry["accuracy"] > 0.1, name
    # FL is never affected by overlays.
    assert clean["fl"]["fl_model_sha256"] == clean["emo"]["fl_model_sha256"]
    assert clean["fl"]["fl_model_sha256"] == clean["emo_all"]["fl_model_sha256"]
    assert clean["sfl"]["bytes_by_kind"]["gradients"] > 0
    assert clean["sfl_v1"]["bytes_by_kind"]["gradients"] > 0


async def rogue(
    broker: MemoryBroker, config: RunConfig, algorithm: str, attacks: list[tuple[str, bytes]]
) -> None:
    """Once round 1 is announced, publish every attack as dev00 (or ovl0)."""
    r = run_id(config, algorithm)
    async with open_bus(broker, "rogue", clean_start=True) as bus:
        await bus.subscribe(topic(Kind.SERVER_ROUND, r))
        async for message in bus.messages():
            if decode(bytes(message.payload)).body["round"] >= 1:
                break
        for where, payload in attacks:
            await bus.publish(where.replace("RUN", r), payload)


def frame(
    body: dict[str, Any], kind: str, sender: str, algorithm: str, config: RunConfig, seq: int
) -> bytes:
    return encode(body, kind=kind, sender=sender, run=run_id(config, algorithm), seq=seq)


def hostile_run(
    config: RunConfig,
    algorithm: str,
    plan: DataPlan,
    attacks: list[tuple[str, bytes]],
    out: Path | None = None,
) -> dict[str, Any]:
    broker = MemoryBroker()

    async def scenario() -> dict[str, Any]:
        side = asyncio.create_task(rogue(broker, config, algorithm, attacks))
        try:
            return await run_algorithm(
                broker, config, algorithm, plan, out_dir=out, say=lambda _: None
            )
        finally:
            side.cancel()

    return asyncio.run(scenario())


def test_hostile_updates_never_stop_or_change_fl(
    config: RunConfig, plan: DataPlan, clean: dict[str, dict[str, Any]]
) -> None:
    limits = limits_for(config, Algorithm.FL, plan)
    assert limits.round_weights is not None
    zeros = {
        k: np.zeros(shape, np.dtype(dtype)) for k, (shape, dtype) in limits.round_weights.items()
    }
    update = "emo/RUN/device/dev00/update"
    bodies = [
        {"round": float("inf"), "weights": zeros, "samples": 10, "loss": 0.1},
        {"round": 2**63, "weights": zeros, "samples": 10, "loss": 0.1},
        {"round": 1, "weights": zeros, "samples": 10**15, "loss": 0.1},
        {"round": 1, "weights": zeros, "samples": True, "loss": 0.1},
        {"round": 1, "weights": [1], "samples": 10, "loss": 0.1},
    ]
    attacks = [
        (update, frame(b, "update", "dev00", "fl", config, 10_000 + i))
        for i, b in enumerate(bodies)
    ]
    # A frame of another kind on the update topic.
    attacks.append((update, frame({"round": 1}, "round", "dev00", "fl", config, 20_000)))
    # A status nested 5,000 deep (json.loads raises RecursionError on it).
    deep = ("[" * 5000 + "]" * 5000).encode()
    attacks.append(("emo/RUN/telemetry/status/device/dev00", deep))
    entry = hostile_run(config, "fl", plan, attacks)
    rejected = entry["rejected"]
    assert rejected.get("update:bad_type", 0) >= 3, rejected  # inf, True, [1]
    assert rejected.get("update:out_of_range", 0) >= 2, rejected  # 2**63, 10**15
    assert rejected.get("update:wrong_kind", 0) == 1, rejected
    assert rejected.get("bad_json", 0) >= 1, rejected
    assert entry["rounds"] == 2
    assert entry["fl_model_sha256"] == clean["fl"]["fl_model_sha256"]


def test_hostile_splitfed_batches_are_refused(
    config: RunConfig, plan: DataPlan, clean: dict[str, dict[str, Any]]
) -> None:
    shape = limits_for(config, Algorithm.SFL, plan).activation_shape
    assert shape is not None
    where = "emo/RUN/device/dev00/sfl/activations"
    bodies = [
        {
            "round": 1,
            "batch": 0,
            "activations": np.ones((4, 3), np.float32),
            "labels": np.zeros(4, np.int64),
        },
        {
            "round": 1,
            "batch": 0,
            "activations": np.full((4, *shape), np.nan, np.float32),
            "labels": np.zeros(4, np.int64),
        },
        {
            "round": 1,
            "batch": 0,
            "activations": np.ones((4, *shape), np.float32),
            "labels": np.full(4, 1000, np.int64),
        },
    ]
    attacks = [
        (where, frame(b, "sfl.activations", "dev00", "sfl", config, 30_000 + i))
        for i, b in enumerate(bodies)
    ]
    entry = hostile_run(config, "sfl", plan, attacks)
    rejected = entry["rejected"]
    assert rejected.get("sfl.activations:bad_shape", 0) == 1, rejected
    assert rejected.get("sfl.activations:non_finite", 0) == 1, rejected
    assert rejected.get("sfl.activations:out_of_range", 0) == 1, rejected
    assert entry["rounds"] == 2
    assert entry["fl_model_sha256"] == clean["sfl"]["fl_model_sha256"]


def test_huge_finite_splitfed_batch_neither_stops_nor_changes_the_run(
    config: RunConfig, plan: DataPlan, clean: dict[str, dict[str, Any]]
) -> None:
    """Finite activations near float32's limit pass validation but overflow the server
    half: refused as ``non_finite`` (not taken for divergence: the head is sound on
    validation images), the head is not stepped, and the run ends as the clean one."""
    shape = limits_for(config, Algorithm.SFL, plan).activation_shape
    assert shape is not None
    huge = np.where(np.arange(4 * int(np.prod(shape))) % 2 == 0, 3e38, -3e38)
    body = {
        "round": 1,
        "batch": 0,
        "activations": huge.reshape(4, *shape).astype(np.float32),
        "labels": np.zeros(4, np.int64),
    }
    where = "emo/RUN/device/dev00/sfl/activations"
    attacks = [(where, frame(body, "sfl.activations", "dev00", "sfl", config, 30_100))]
    entry = hostile_run(config, "sfl", plan, attacks)
    assert entry["rejected"].get("sfl.activations:non_finite", 0) == 1, entry["rejected"]
    assert entry["rounds"] == 2
    assert entry["fl_model_sha256"] == clean["sfl"]["fl_model_sha256"]


def test_poisoned_overlay_and_activations(
    config: RunConfig, plan: DataPlan, clean: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    limits = limits_for(config, Algorithm.EMO, plan)
    assert limits.overlay_weights is not None and limits.activation_shape is not None
    nan = {
        k: np.full(shape, np.nan, np.dtype(dtype))
        if np.dtype(dtype).kind == "f"
        else np.zeros(shape, np.dtype(dtype))
        for k, (shape, dtype) in limits.overlay_weights.items()
    }
    acts = "emo/RUN/device/dev00/activations"
    n = 64
    good = {
        "sample_ids": np.arange(n),
        "labels": np.arange(n) % 10,
        "data": np.ones((n, *limits.activation_shape), np.float32),
        "scale": None,
        "last": False,
    }
    attacks = [
        (
            "emo/RUN/overlay/ovl0/model",
            frame(
                {"round": 1, "version": 99, "weights": nan, "loss": 0.5, "entries": 1},
                "overlay.model",
                "ovl0",
                "emo",
                config,
                40_000,
            ),
        ),
        (acts, frame({**good, "round": 2**63}, "activations", "dev00", "emo", config, 40_001)),
        (
            acts,
            frame(
                {**good, "round": 1, "labels": np.full(n, 1000)},
                "activations",
                "dev00",
                "emo",
                config,
                40_002,
            ),
        ),
        # A valid round far in the future would never go stale in the cache.
        (acts, frame({**good, "round": 2**31 - 1}, "activations", "dev00", "emo", config, 40_003)),
    ]
    entry = hostile_run(config, "emo", plan, attacks, out=tmp_path)
    rejected = entry["rejected"]
    assert rejected.get("overlay.model:non_finite", 0) == 1, rejected
    assert rejected.get("activations:out_of_range", 0) == 2, rejected
    assert rejected.get("activations:ahead", 0) == 1, rejected
    assert entry["poisoned_overlays"] == {"ovl0": 1}
    assert entry["rounds"] == 2
    assert entry["fl_model_sha256"] == clean["emo"]["fl_model_sha256"]
    # The saved ensemble holds no NaN (the poisoned version never entered it).
    ensemble = Ensemble.load(tmp_path / "emo" / "ensemble.npz")
    for overlay in ensemble.overlays.values():
        for value in overlay.state_dict().values():
            assert bool(value.isfinite().all())
    saved = json.loads((tmp_path / "emo" / "server.json").read_text())
    assert saved["final"]["poisoned_overlays"] == {"ovl0": 1}


def test_a_failing_handler_is_counted_and_a_dead_loop_fails_the_node(
    config: RunConfig, plan: DataPlan
) -> None:
    """A handler's exception is counted and the loop goes on; a loop that dies anyway makes
    the node (and so ``emo run``) fail loudly instead of ending quietly."""
    from emo_mqtt.fleet import build_nodes
    from emo_mqtt.nodes.base import NodeFailed
    from emo_mqtt.nodes.device import DeviceNode

    broker = MemoryBroker()

    async def scenario() -> tuple[dict[str, int], BaseException | None]:
        server, others = build_nodes(broker, config, "fl", plan, None)
        server.start_timeout_s = 0.1
        devices = [n for n in others if isinstance(n, DeviceNode)]
        flaky, doomed = devices[0], devices[1]

        raised = asyncio.Event()

        async def broken(*_: Any) -> None:
            raised.set()  # the node counts the error in the same step, before we wake
            raise RuntimeError("a bug")

        parse, _ = flaky.handlers[Kind.SERVER_ROUND]
        flaky.handlers[Kind.SERVER_ROUND] = (parse, broken)

        async def dies(_: Any) -> None:
            raise RuntimeError("the loop itself")

        doomed.dispatch = dies  # type: ignore[method-assign,assignment]
        tasks = [asyncio.create_task(n.run_node()) for n in (server, flaky, doomed)]
        try:
            done, _ = await asyncio.wait([tasks[2]], timeout=30)
            assert done, "the doomed device never failed"
            err = tasks[2].exception()
            await asyncio.wait_for(raised.wait(), 30)
            return dict(flaky.bus.stats.rejected), err
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    rejected, err = asyncio.run(scenario())
    assert rejected.get("round:handler_error", 0) >= 1
    assert isinstance(err, NodeFailed)
