"""A shortened fleet through a real Mosquitto: FedAvg, SplitFed and EMO end to end.

One module-scoped run of every algorithm feeds several tests: the summary's shape, the
FL model's bit-identity with and without overlays, bytes by kind, saved models, and the
MQTT inference service.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.config import RunConfig, from_dict
from emo_mqtt.data import load_fashion_mnist
from emo_mqtt.fleet import run_scenario
from emo_mqtt.infer import load_predictor, request_inference, serve_inference

pytestmark = pytest.mark.broker

SHORT: dict[str, Any] = {
    "run": {
        "name": "short",
        "seed": 3,
        "rounds": 3,
        "algorithms": ["fl", "sfl", "sfl_v1", "emo", "emo_all"],
        "target_accuracy": 0.5,
    },
    "data": {
        "alpha": 0.5,
        "samples_per_device": 300,
        "validation_samples": 500,
        "eval_samples_per_round": 500,
    },
    "fleet": {"devices": 4, "overlays": 2, "min_updates": 2, "round_deadline_s": 60},
    "emo": {"overlay_steps_per_round": 20, "cache_entries": 2000},
}


@pytest.fixture(scope="module")
def short_run(
    mosquitto: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, dict[str, Any], Path]:
    config = from_dict(SHORT)
    out = tmp_path_factory.mktemp("short-run")
    lines: list[str] = []
    summary = asyncio.run(run_scenario(mosquitto.url, config, out, say=lines.append))
    assert any("round   3/3" in line for line in lines), "progress lines were shown"
    return config, summary, out


def test_summary_has_every_algorithm(short_run: tuple[RunConfig, dict[str, Any], Path]) -> None:
    config, summary, out = short_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["algorithms"].keys() == summary["algorithms"].keys()
    for name, entry in summary["algorithms"].items():
        assert 0.0 <= entry["accuracy"] <= 1.0, name
        assert len(entry["accuracy_per_round"]) == config.run.rounds == entry["rounds"]
        assert entry["bytes"] == sum(entry["bytes_by_kind"].values()) > 0
        assert entry["wall_s"] > 0
        assert entry["nodes_reporting"] == 1 + 4 + (2 if name.startswith("emo") else 0)
        assert entry["rejected"].get("bad_payload", 0) == 0
        # Real training on real data: better than chance after three rounds.
        assert entry["accuracy"] > 0.3, name


def test_bytes_by_kind_match_each_algorithm(
    short_run: tuple[RunConfig, dict[str, Any], Path],
) -> None:
    algos = short_run[1]["algorithms"]
    assert "activations" not in algos["fl"]["bytes_by_kind"]
    for sfl in ("sfl", "sfl_v1"):
        kinds = algos[sfl]["bytes_by_kind"]
        assert kinds["activations"] > 0 and kinds["gradients"] > 0
    assert "gradients" not in algos["emo"]["bytes_by_kind"]
    assert algos["emo"]["bytes_by_kind"]["activations"] > 0
    assert algos["emo"]["bytes_by_kind"]["control"] > 0
    # Sending everything at fp32 can only cost more activation bytes than the controller.
    assert (
        algos["emo_all"]["bytes_by_kind"]["activations"]
        >= algos["emo"]["bytes_by_kind"]["activations"]
    )
    assert algos["sfl"]["bytes"] > algos["emo"]["bytes"]


def test_fl_model_is_bit_identical_with_overlays(
    short_run: tuple[RunConfig, dict[str, Any], Path],
) -> None:
    _, summary, out = short_run
    algos = summary["algorithms"]
    assert algos["fl"]["fl_model_sha256"] == algos["emo"]["fl_model_sha256"]
    assert algos["fl"]["fl_model_sha256"] == algos["emo_all"]["fl_model_sha256"]
    assert summary["comparisons"]["fl_model_identical_with_overlays"] is True
    with np.load(out / "fl" / "fl_model.npz") as a, np.load(out / "emo" / "fl_model.npz") as b:
        assert a.files == b.files
        for name in a.files:
            assert a[name].tobytes() == b[name].tobytes()
    assert algos["fl"]["fl_accuracy_per_round"] == algos["emo"]["fl_accuracy_per_round"]


def test_controller_decisions_are_recorded(
    short_run: tuple[RunConfig, dict[str, Any], Path],
) -> None:
    decisions = short_run[1]["algorithms"]["emo"]["controller_decisions"]
    assert {d["round"] for d in decisions} == {1, 2, 3}
    assert all(
        0 < d["fraction"] <= 1 and d["precision"] in ("fp32", "fp16", "int8") for d in decisions
    )


def test_saved_ensemble_matches_the_summary(
    short_run: tuple[RunConfig, dict[str, Any], Path],
) -> None:
    _, summary, out = short_run
    predictor = load_predictor(out, "emo")
    assert predictor.ensemble is not None
    _, test = load_fashion_mnist()
    accuracy = float(np.mean(predictor.predict_proba(test.x).argmax(1) == test.y))
    assert accuracy == pytest.approx(summary["algorithms"]["emo"]["accuracy"], abs=1e-9)


def test_inference_service_over_mqtt(
    mosquitto: BrokerHandle,
    short_run: tuple[RunConfig, dict[str, Any], Path],
) -> None:
    predictor = load_predictor(short_run[2], "emo")
    _, test = load_fashion_mnist()

    async def scenario() -> tuple[np.ndarray, str]:
        stop, ready = asyncio.Event(), asyncio.Event()
        service = asyncio.create_task(
            serve_inference(mosquitto.url, predictor, stop=stop, ready=ready)
        )
        await asyncio.wait_for(ready.wait(), 10)
        probs = await request_inference(mosquitto.url, predictor.run, test.x[:64])
        try:
            await request_inference(mosquitto.url, predictor.run, np.zeros((2, 3), np.float32))
            refused = ""
        except Exception as exc:  # the service answers with an error, never crashes
            refused = str(exc)
        again = await request_inference(mosquitto.url, predictor.run, test.x[:8])
        stop.set()
        await asyncio.wait_for(service, 10)
        assert np.allclose(again, probs[:8])
        return probs, refused

    probs, refused = asyncio.run(scenario())
    assert probs.shape == (64, 10)
    assert np.allclose(probs, predictor.predict_proba(test.x[:64]), atol=1e-6)
    assert "images must be" in refused


def test_garbage_on_every_topic_is_counted_and_changes_nothing(
    mosquitto: BrokerHandle,
    short_run: tuple[RunConfig, dict[str, Any], Path],
    tmp_path: Path,
) -> None:
    """Flood the nodes' topics with garbage during a run: same FL model, counted rejections."""
    from emo_mqtt.bus import open_bus
    from emo_mqtt.chunking import split
    from emo_mqtt.codec import encode

    # A fixed run id: the vandal must know the topics before the run starts.
    config = from_dict({**SHORT, "run": {**SHORT["run"], "algorithms": ["emo"], "id": "short"}})
    run = "short-emo"
    rng = np.random.default_rng(0)
    targets = [
        f"emo/{run}/device/dev00/update",
        f"emo/{run}/device/dev01/activations",
        f"emo/{run}/server/round",
        f"emo/{run}/control/dev02",
        f"emo/{run}/overlay/ovl0/model",
        f"emo/{run}/telemetry/status/device/dev03",
        f"emo/{run}/device/dev02/sfl/activations",
    ]

    async def flood(stop: asyncio.Event) -> int:
        sent = 0
        async with open_bus(mosquitto.url, "vandal", clean_start=True) as bus:
            while not stop.is_set():
                for where in targets:
                    await bus.publish(where, rng.bytes(int(rng.integers(0, 300))))
                    # Well-formed frames with the wrong body, and chunk floods never completed.
                    await bus.publish(
                        where,
                        encode({"round": "x"}, kind="update", sender="dev00", run=run, seq=sent),
                    )
                    await bus.publish(where, split(rng.bytes(5000), chunk_size=1000)[0])
                    sent += 3
                await asyncio.sleep(0.05)
        return sent

    async def scenario() -> tuple[dict[str, Any], int]:
        stop = asyncio.Event()
        vandal = asyncio.create_task(flood(stop))
        try:
            summary = await run_scenario(mosquitto.url, config, tmp_path, say=lambda _: None)
        finally:
            stop.set()
        return summary, await vandal

    summary, sent = asyncio.run(scenario())
    emo = summary["algorithms"]["emo"]
    clean = short_run[1]["algorithms"]["emo"]
    assert sent > 0
    # FL is deterministic: garbage never reached the average.
    assert emo["fl_model_sha256"] == clean["fl_model_sha256"]
    rejected = emo["rejected"]
    assert rejected.get("bad_payload", 0) > 0
    assert rejected.get("bad_message", 0) + rejected.get("wrong_run", 0) >= 0
    assert sum(rejected.values()) >= 10
