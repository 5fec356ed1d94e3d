"""The same nodes as separate processes (`emo node ...`), sharing nothing but the broker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.infer import load_predictor

pytestmark = pytest.mark.broker


def _emo(*args: str) -> list[str]:
    return [sys.executable, "-m", "emo_mqtt.cli", *args]


def test_separate_processes_complete_an_emo_run(
    mosquitto: BrokerHandle, tmp_path: Path, tiny_scenario: Callable[[str], Path]
) -> None:
    scenario = tiny_scenario("multi")
    common = [
        "--broker",
        mosquitto.url,
        "--run",
        "multi-proc",
        "--config",
        str(scenario),
        "--algorithm",
        "emo",
    ]
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            _emo("node", "device", "--id", d, *common), stderr=subprocess.PIPE, text=True
        )
        for d in ("dev00", "dev01")
    ]
    procs.append(
        subprocess.Popen(
            _emo("node", "overlay", "--id", "ovl0", *common), stderr=subprocess.PIPE, text=True
        )
    )
    procs.append(
        subprocess.Popen(
            _emo("node", "server", *common, "--out", str(out)), stderr=subprocess.PIPE, text=True
        )
    )
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            proc.kill()
    meta = json.loads((out / "emo" / "server.json").read_text())
    assert meta["run"] == "multi-proc"
    assert [h["round"] for h in meta["history"]] == [1, 2]
    assert all(h["updates"] == 2 for h in meta["history"])
    assert meta["final"]["member_accuracy"].keys() == {"fl", "ovl0"}
    assert load_predictor(out, "emo").ensemble is not None


def test_bad_node_arguments_are_refused(tiny_scenario: Callable[[str], Path]) -> None:
    scenario = tiny_scenario("multi")
    result = subprocess.run(
        _emo(
            "node",
            "device",
            "--broker",
            "mqtt://127.0.0.1:9",
            "--run",
            "x",
            "--id",
            "dev07",
            "--config",
            str(scenario),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--id 'dev07' is not a device" in result.stderr
