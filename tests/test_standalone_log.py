"""Standalone nodes say what they do at INFO, by default (issue 14 item 5)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from emo_mqtt.broker.launch import BrokerHandle

EMO = str(Path(sys.executable).with_name("emo"))


def test_standalone_server_and_devices_log_each_event(
    mosquitto: BrokerHandle, tiny_scenario: Callable[[str], Path]
) -> None:
    scenario = str(tiny_scenario("solo"))
    common = ["--broker", mosquitto.url, "--run", "solo-log", "--config", scenario]
    common += ["--algorithm", "fl"]
    server = subprocess.Popen([EMO, "node", "server", *common], stderr=subprocess.PIPE, text=True)
    devices = [
        subprocess.Popen(
            [EMO, "node", "device", "--id", d, *common], stderr=subprocess.PIPE, text=True
        )
        for d in ("dev00", "dev01")
    ]
    try:
        _, server_err = server.communicate(timeout=240)
        device_errs = [d.communicate(timeout=60)[1] for d in devices]
    finally:
        for proc in (server, *devices):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert server.returncode == 0, server_err
    lines = server_err.splitlines()
    assert any("server server: connected, online as solo-log-server-server" in x for x in lines)
    assert sum("server: all 2 nodes online" in x for x in lines) == 1, server_err
    for r in (1, 2):
        assert sum(f"round {r}/2 open: 2 devices sampled" in x for x in lines) == 1, server_err
        # The very progress line of `emo run`, one per closed round.
        assert sum(f"[     fl] round   {r}/2  acc " in x for x in lines) == 1, server_err
    assert sum("server: done: accuracy" in x for x in lines) == 1, server_err
    assert "Traceback" not in server_err
    for err in device_errs:
        assert "round 1 trained, update sent" in err and "done (round 2" in err, err
