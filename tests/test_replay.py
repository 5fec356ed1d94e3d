"""Network scenarios replayed against a real Mosquitto: shaped links, outages, bad files.

Each node of a shaped run reaches the broker through its own proxy
(:class:`emo_mqtt.netreplay.NetworkReplay`), so what these tests measure is what MQTT itself
went through: publish times, dropped connections, reconnects and QoS 1 redelivery.
"""

from __future__ import annotations

import asyncio
import csv
import time
from pathlib import Path
from typing import Any

import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import open_bus
from emo_mqtt.cli import main
from emo_mqtt.config import RunConfig, from_dict
from emo_mqtt.dataplan import plan_data
from emo_mqtt.fleet import fleet_node_ids, run_algorithm
from emo_mqtt.netreplay import NetworkReplay

pytestmark = pytest.mark.broker

FLEET: dict[str, Any] = {
    "run": {"name": "netrep", "seed": 5, "rounds": 3, "algorithms": ["fl"]},
    "data": {"samples_per_device": 200, "validation_samples": 300, "eval_samples_per_round": 300},
    # Every round waits for all four updates: a lost update would stall it to the deadline
    # and close it with three, which the test would see.
    "fleet": {"devices": 4, "overlays": 1, "min_updates": 4, "round_deadline_s": 40},
}


def _config(network: dict[str, Any] | None) -> RunConfig:
    raw = dict(FLEET)
    if network is not None:
        raw["network"] = network
    return from_dict(raw)


def test_a_shaped_uplink_is_slower_by_the_amount_asked(mosquitto: BrokerHandle) -> None:
    """1 MB over a 4 Mbit/s (500 kB/s) device uplink: about 2 s; unshaped: a blink."""
    config = _config({"device": {"up_mbps": 4.0, "latency_ms": 20}})
    payload = bytes(1_000_000)

    async def publish_through(node: str) -> float:
        replay = NetworkReplay(
            config.network, mosquitto.url, fleet_node_ids(config, "fl"), seed=1, horizon_s=60
        )
        async with replay, open_bus(replay.url(node), f"netrep-{node}", clean_start=True) as bus:
            began = time.monotonic()
            await bus.publish("emo/netrep/bench/x", payload)
            return time.monotonic() - began

    shaped = asyncio.run(publish_through("dev00"))
    unshaped = asyncio.run(publish_through("server"))  # the server's link is not shaped
    expected = 1_000_000 / 500_000  # the token bucket's 64 KiB burst makes it a bit less
    assert expected * 0.8 <= shaped <= expected * 1.5, shaped
    assert unshaped < 0.5, unshaped


def _fl_hash(summary: dict[str, Any]) -> str:
    return str(summary["fl_model_sha256"])


def test_outages_in_a_trace_reconnect_nodes_without_losing_a_qos1_update(
    mosquitto: BrokerHandle, tmp_path: Path, one_torch_thread: None
) -> None:
    """dev01's slow uplink is cut twice mid-upload, then the broker drops out for everyone.

    Every round still closes with all four updates, and the FL model is bit-identical to
    the same run without a network: nothing was lost and nothing counted twice.
    """
    plan = plan_data(_config(None))
    clean = asyncio.run(run_algorithm(mosquitto.url, _config(None), "fl", plan, say=lambda _: None))
    # dev01's 24 kB update takes ~4 s at 0.05 Mbit/s (6.25 kB/s): the cuts at 2 s and 7 s
    # land while it is uploading (the message log below checks that they did).
    network = {
        "device": {"latency_ms": 10},
        "nodes": {"dev01": {"up_mbps": 0.05}},
        "events": [
            {"at_s": 2.0, "target": "dev01", "action": "down", "for_s": 1.5},
            {"at_s": 7.0, "target": "dev01", "action": "down", "for_s": 1.5},
            {"at_s": 11.0, "target": "broker", "action": "down", "for_s": 1.0},
        ],
    }
    config = _config(network)
    out = tmp_path / "out"
    entry = asyncio.run(
        run_algorithm(mosquitto.url, config, "fl", plan, out_dir=out, say=lambda _: None)
    )

    assert entry["rounds"] == 3
    assert _fl_hash(entry) == _fl_hash(clean)
    applied = [(e["node"], e["action"]) for e in entry["network"]["events"]]
    assert applied[:4] == [("dev01", "down"), ("dev01", "up"), ("dev01", "down"), ("dev01", "up")]
    links = entry["network"]["links"]
    assert links["dev01"]["outages"] >= 2 and links["dev01"]["dropped_by_outage"] >= 2
    assert links["dev01"]["connections"] >= 3  # it reconnected after each cut
    # The log shows an update of dev01 that was in flight across a cut and still arrived.
    with (out / "fl" / "messages.csv").open() as f:
        rows = list(csv.DictReader(f))
    updates = [r for r in rows if r["sender"] == "dev01" and r["topic"].endswith("/update")]
    assert len(updates) == 3
    cuts = [(2.0, 3.5), (7.0, 8.5)]
    assert any(
        float(u["time_s"]) < a and float(u["ack_s"]) > b for u in updates for a, b in cuts
    ), updates
    # After each reconnect dev01 said it was online again (the broker had published its will).
    statuses = [r for r in rows if r["sender"] == "dev01" and "/status/" in r["topic"]]
    assert len(statuses) >= 4, statuses  # online, online after each cut, offline at the end


def test_a_bad_network_section_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[run]\nname = "bad"\n[network.device]\nup_mbps = -2\n')
    assert main(["run", str(path), "--broker", "mqtt://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "network.device.up_mbps" in err and "-2" in err
    path.write_text(
        '[run]\nname = "bad"\n[[network.events]]\nat_s = 1\ntarget = "dev99"\naction = "down"\n'
    )
    assert main(["run", str(path), "--broker", "mqtt://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "network.events[0]" in err and "dev99" in err


def test_an_overlay_crash_in_the_timeline_restarts_it_from_its_checkpoint(
    mosquitto: BrokerHandle,
    tmp_path: Path,
    one_torch_thread: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ovl0 crashes mid-run and comes back 1 s later: from its checkpoint, training on.

    Devices compute at a twentieth of this machine's speed, so rounds last long enough for
    the crash to land in the middle of the run (unslowed, the five rounds take about 2 s).
    The timeline waits for ovl0's first checkpoint before it plays: on a loaded machine
    round 1 alone can outlast the crash's ``at_s`` (it took 4 s at a load of 5 on 2 cores),
    and a crash before any training has nothing to resume from. Event times still count
    from the start of the run.
    """
    meta = tmp_path / "out" / "checkpoints" / "emo" / "ovl0" / "overlay.json"
    play = NetworkReplay.run_timeline

    async def after_first_checkpoint(self: NetworkReplay, started: float) -> None:
        deadline = time.monotonic() + 120
        while not meta.exists():
            if time.monotonic() > deadline:
                raise AssertionError("ovl0 never wrote a checkpoint")
            await asyncio.sleep(0.01)
        await play(self, started)

    monkeypatch.setattr(NetworkReplay, "run_timeline", after_first_checkpoint)
    raw = {
        **FLEET,
        "run": {**FLEET["run"], "name": "netcrash", "rounds": 5, "algorithms": ["emo"]},
        "fleet": {**FLEET["fleet"], "device_compute_speed": 0.05},
        "emo": {"overlay_steps_per_round": 10},
    }
    raw["network"] = {"events": [{"at_s": 2.5, "target": "ovl0", "action": "crash", "for_s": 1.0}]}
    config = from_dict(raw)
    out = tmp_path / "out"
    lines: list[str] = []
    entry = asyncio.run(
        run_algorithm(
            mosquitto.url, config, "emo", plan_data(config), out_dir=out, say=lines.append
        )
    )
    assert entry["rounds"] == 5
    events = {e["action"]: e for e in entry["network"]["events"] if e["node"] == "ovl0"}
    assert set(events) == {"crash", "restart"}
    assert all("error" not in e and "skipped" not in e for e in events.values())
    assert any("ovl0 crashes" in line for line in lines)
    # The restarted ovl0 resumed from the checkpoint its first life wrote, and went on
    # publishing models after the restart.
    assert meta.exists()
    with (out / "emo" / "messages.csv").open() as f:
        rows = list(csv.DictReader(f))
    restarted = float(events["restart"]["applied_s"])
    models = [r for r in rows if r["sender"] == "ovl0" and r["topic"].endswith("/model")]
    assert any(float(r["time_s"]) < restarted for r in models), "ovl0 trained before the crash"
    assert any(float(r["time_s"]) > restarted for r in models), "and again after it"


def test_each_node_gets_its_proxy_with_the_broker_login() -> None:
    """A node behind a proxy logs in as it would directly (the proxy only relays bytes)."""
    from emo_mqtt.broker.url import parse_broker_url

    config = _config({"device": {"up_mbps": 1.0}})

    async def urls() -> list[str]:
        replay = NetworkReplay(
            config.network,
            "mqtt://us%40er:p%3Ass@127.0.0.1:9",
            fleet_node_ids(config, "fl"),
            seed=1,
            horizon_s=10,
        )
        async with replay:
            return [replay.url(n) for n in ("server", "dev00", "dev01")]

    parsed = [parse_broker_url(u) for u in asyncio.run(urls())]
    assert len({u.port for u in parsed}) == 3  # one proxy each
    assert all((u.host, u.username, u.password) == ("127.0.0.1", "us@er", "p:ss") for u in parsed)
