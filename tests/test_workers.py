"""``emo run --workers``: a fleet spread over worker processes, through a real Mosquitto.

Each worker is a fresh interpreter (torch, the data): the fleet is small and the run one
round, and the checks are what only the worker path can get wrong: every node of every
worker connects, trains when sampled and reports its final metrics, the summary is whole,
and a worker that fails fails the run with a clear error.
"""

from __future__ import annotations

import asyncio
import csv
import time
from pathlib import Path
from typing import Any

import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import MemoryBroker
from emo_mqtt.config import from_dict
from emo_mqtt.errors import ConfigError
from emo_mqtt.fleet import run_scenario
from emo_mqtt.placement import BrokerMap
from emo_mqtt.workers import WorkerFailed, WorkerSpec, run_worker

SMALL: dict[str, Any] = {
    "run": {"name": "workers", "seed": 5, "rounds": 1, "algorithms": ["emo"]},
    "data": {
        "alpha": 1.0,
        "samples_per_device": 40,
        "validation_samples": 300,
        "eval_samples_per_round": 300,
    },
    "fleet": {
        "devices": 40,
        "overlays": 4,
        "sample_fraction": 0.25,
        "min_updates": 10,
        "round_deadline_s": 60,
    },
    "emo": {"overlay_steps_per_round": 5, "cache_entries": 2000},
}


@pytest.mark.broker
def test_a_fleet_runs_in_two_worker_processes(mosquitto: BrokerHandle, tmp_path: Path) -> None:
    config = from_dict(SMALL)
    lines: list[str] = []
    began = time.monotonic()
    summary = asyncio.run(
        run_scenario(mosquitto.url, config, tmp_path, say=lines.append, workers=2)
    )
    assert time.monotonic() - began < 300, "a hang is a failure, not a slow pass"
    assert any("in 2 worker processes" in line for line in lines), lines
    emo = summary["algorithms"]["emo"]
    assert emo["rounds"] == 1
    # Every node of both workers (40 devices, 4 overlays) sent its final metrics.
    assert emo["nodes_reporting"] == 1 + 40 + 4
    assert emo["bytes_by_kind"]["weights"] > 0
    assert emo["bytes_by_kind"]["activations"] > 0  # overlays in the workers got them
    assert emo["fl_accuracy_per_round"][0] > 0.1
    # The workers' message logs came back to the launcher: ten devices sampled (a quarter
    # of 40), and every one's update is in it.
    with (tmp_path / "emo" / "messages.csv").open() as f:
        rows = list(csv.DictReader(f))
    senders = {row["sender"] for row in rows if row["topic"].endswith("/update")}
    assert len(senders) == 10, senders


def test_workers_refuse_the_in_memory_bus() -> None:
    config = from_dict({**SMALL, "fleet": {"devices": 4, "overlays": 1}})
    with pytest.raises(ConfigError, match="--workers"):
        asyncio.run(run_scenario(MemoryBroker(), config, None, say=lambda _: None, workers=2))


def test_a_failing_worker_fails_with_its_error() -> None:
    config = from_dict({**SMALL, "fleet": {"devices": 4, "overlays": 1}})
    spec = WorkerSpec(
        index=7,
        config=config.to_dict(),
        source="",
        algorithm="fl",
        nodes=("dev99",),  # not a device of this fleet: the worker cannot build it
        brokers=BrokerMap("mqtt://127.0.0.1:9"),
        incarnation="x",
        out_dir=None,
        log_origin=time.monotonic(),
    )
    with pytest.raises(WorkerFailed, match=r"worker 7: .*dev99"):
        asyncio.run(run_worker(spec))
