"""Plots and report.md of a run (emo_mqtt.report), and ``emo run --jsonl`` end to end."""

from __future__ import annotations

import asyncio
import json
import math
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emo_mqtt.bus import MemoryBroker, open_bus
from emo_mqtt.config import from_dict
from emo_mqtt.dataplan import plan_data
from emo_mqtt.fleet import run_algorithm, run_id
from emo_mqtt.report import PLOTS, write_report
from emo_mqtt.topics import Kind, subscription

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _synthetic_summary(with_bytes_per_round: bool = True) -> dict[str, Any]:
    algorithms: dict[str, Any] = {}
    for i, name in enumerate(["fl", "sfl", "emo"]):
        acc = [0.5 + 0.3 * (1 - math.exp(-r / (2 + i))) for r in range(1, 6)]
        entry: dict[str, Any] = {
            "accuracy": acc[-1],
            "fl_accuracy": acc[-1] - 0.01 * i,
            "accuracy_per_round": acc,
            "fl_accuracy_per_round": acc,
            "time_per_round_s": [1.5 * r * (1 + i) for r in range(1, 6)],
            "bytes": 5_000_000 * (1 + i),
            "bytes_by_kind": {"weights": 4_000_000, "activations": 1_000_000 * i},
            "wall_s": 7.5 * (1 + i),
            "sim_time_s": 7.5 * (1 + i),
            "rounds": 5,
            "time_to_target_s": None,
        }
        if with_bytes_per_round:
            entry["bytes_per_round"] = [1_000_000 * r * (1 + i) for r in range(1, 6)]
        algorithms[name] = entry
    return {
        "scenario": "scenarios/synthetic.toml",
        "config": {
            "run": {"name": "synthetic", "rounds": 5, "target_accuracy": 0.9},
            "fleet": {"devices": 4, "overlays": 2},
        },
        "algorithms": algorithms,
        "comparisons": {"emo_minus_fl_points": 1.23, "sfl_bytes_over_emo_bytes": 0.67},
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR"
    ihdr = data[16 : 16 + length]
    assert zlib.crc32(chunk + ihdr) == struct.unpack(">I", data[16 + length : 20 + length])[0]
    width, height = struct.unpack(">II", ihdr[:8])
    return width, height


def test_write_report_writes_plots_and_markdown(tmp_path: Path) -> None:
    written = write_report(_synthetic_summary(), tmp_path)
    names = [p.name for p in written]
    assert names == [name for name, _, _ in PLOTS] + ["report.md"]
    for path in written[:-1]:
        width, height = _png_size(path)
        assert width >= 400 and height >= 300
    report = (tmp_path / "report.md").read_text()
    assert "| algorithm | accuracy | FL model accuracy | MB sent |" in report
    for name in ("fl", "sfl", "emo"):
        assert f"| {name} | " in report
    assert "`emo_minus_fl_points`): 1.23" in report
    for name, _, _ in PLOTS:
        assert f"]({name})" in report
    assert "bytes estimated" not in report


def test_old_summaries_without_bytes_per_round_still_plot(tmp_path: Path) -> None:
    written = write_report(_synthetic_summary(with_bytes_per_round=False), tmp_path / "new")
    assert all(p.exists() for p in written)
    assert "bytes estimated" in (tmp_path / "new" / "report.md").read_text()


@pytest.mark.broker
def test_emo_run_jsonl_prints_events_and_writes_the_report(
    tmp_path: Path, tiny_scenario: Callable[[str], Path]
) -> None:
    scenario = tiny_scenario("tiny")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emo_mqtt.cli",
            "run",
            str(scenario),
            "--rounds",
            "2",
            "--algorithms",
            "fl",
            "--jsonl",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    rounds = [e for e in events if e["event"] == "round"]
    assert [(e["algorithm"], e["round"]) for e in rounds] == [("fl", 1), ("fl", 2)]
    for e in rounds:
        assert {"accuracy", "fl_accuracy", "bytes_so_far", "wall_s"} <= e.keys()
        assert 0.0 <= e["accuracy"] <= 1.0 and e["bytes_so_far"] > 0
    assert events[-1]["event"] == "done"
    assert Path(events[-1]["summary"]) == out / "summary.json"
    assert "round   2/2" in result.stderr  # progress stays on stderr
    summary = json.loads((out / "summary.json").read_text())
    per_round = summary["algorithms"]["fl"]["bytes_per_round"]
    assert len(per_round) == 2 and 0 < per_round[0] <= per_round[1]
    for name, _, _ in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "| fl | " in (out / "report.md").read_text()


#: The metric names docs/monitoring.md promises, by role.
COMMON = {
    "role",
    "id",
    "run",
    "round",
    "time",
    "uptime_s",
    "bytes_out",
    "bytes_out_by_kind",
    "bytes_in",
    "bytes_in_by_kind",
    "messages_out",
    "messages_in",
    "publish_rate_messages_per_s",
    "publish_rate_bytes_per_s",
    "recent_publish_rate_messages_per_s",
    "recent_publish_rate_bytes_per_s",
    "rejected",
    "reconnects",
    "final",
}
BY_ROLE = {
    "device": {
        "algorithm",
        "rounds_trained",
        "loss",
        "activation_bytes",
        "outbox_bytes",
        "outbox_evicted",
        "decision",
        "decision_round",
    },
    "overlay": {
        "loss",
        "version",
        "trained_round",
        "cache",
        "cache_stats",
        "spill_bytes",
        "spill_blocks",
        "spill_capacity_bytes",
        "spill_entries_written",
        "spill_entries_dropped",
        "spill_entries_taken",
    },
    "server": {
        "algorithm",
        "online",
        "loss",
        "accuracy",
        "fl_accuracy",
        "last_round",
        "controller_decisions",
        "rejected_updates",
    },
}


def _strict_json(payload: bytes) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    body = json.loads(payload, parse_constant=refuse)
    assert isinstance(body, dict)
    return body


def test_every_node_publishes_the_documented_metrics(tmp_path: Path) -> None:
    config = from_dict(
        {
            "run": {"name": "metrics", "rounds": 2},
            "data": {
                "samples_per_device": 150,
                "validation_samples": 300,
                "eval_samples_per_round": 300,
            },
            "fleet": {"devices": 2, "overlays": 1, "round_deadline_s": 30},
            "emo": {"overlay_steps_per_round": 5, "cache_entries": 100, "spill_mib": 4},
        }
    )
    plan = plan_data(config)
    broker = MemoryBroker()
    final: dict[str, dict[str, Any]] = {}

    async def scenario() -> dict[str, Any]:
        async with open_bus(broker, "metrics-watcher", clean_start=True) as bus:
            await bus.subscribe(subscription(Kind.METRICS, run_id(config, "emo")))

            async def watch() -> None:
                async for message in bus.messages():
                    if not message.payload:
                        continue  # emo run clearing the retained final metrics
                    body = _strict_json(bytes(message.payload))
                    if body["final"]:
                        final[f"{body['role']}/{body['id']}"] = body

            watcher = asyncio.create_task(watch())
            try:
                return await run_algorithm(
                    broker, config, "emo", plan, out_dir=tmp_path, say=lambda _: None
                )
            finally:
                watcher.cancel()

    summary = asyncio.run(scenario())
    assert set(final) == {"server/server", "overlay/ovl0", "device/dev00", "device/dev01"}
    for name, body in final.items():
        role = name.split("/")[0]
        assert COMMON | BY_ROLE[role] <= body.keys(), name
        assert body["publish_rate_bytes_per_s"] > 0
    device, overlay, server = final["device/dev00"], final["overlay/ovl0"], final["server/server"]
    assert device["bytes_in_by_kind"]["weights"] > 0 and device["bytes_in_by_kind"]["control"] > 0
    assert overlay["bytes_in_by_kind"]["activations"] > 0
    assert isinstance(device["loss"], float) and isinstance(overlay["loss"], float)
    assert isinstance(server["loss"], float) and 0.0 <= server["accuracy"] <= 1.0
    assert set(server["controller_decisions"]) == {"dev00", "dev01"}
    assert overlay["spill_blocks"] > 0 and overlay["spill_bytes"] > 0  # 100 entries overflow
    assert "mean_staleness" in overlay["cache"]
    assert summary["bytes_per_round"][-1] >= summary["bytes_per_round"][0] > 0
