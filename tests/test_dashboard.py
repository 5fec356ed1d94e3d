"""The web dashboard: its pure fleet state, its HTTP server, and the page in a real browser.

The browser test is the one issue 5 asks for: a real Mosquitto, a short real run (FedAvg
and EMO), the dashboard subscribed to it, and Debian's headless Chromium reading the page.
Set ``EMO_UPDATE_SCREENSHOT=1`` to refresh ``docs/dashboard.png`` from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import open_bus
from emo_mqtt.config import from_dict
from emo_mqtt.dashboard.server import serve_dashboard
from emo_mqtt.dashboard.state import FleetState, prometheus_text
from emo_mqtt.fleet import run_scenario

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_MISSING = (
    "the dashboard's browser test needs Debian's Chromium: apt-get install -y chromium"
)
REPO = Path(__file__).resolve().parents[1]


def status(run: str, role: str, node: str, state: str = "online") -> tuple[str, bytes]:
    body = {
        "state": state,
        "role": role,
        "id": node,
        "run": run,
        "version": "0.1.0",
        "round": 0,
        "time": 1000.0,
    }
    return f"emo/{run}/telemetry/status/{role}/{node}", json.dumps(body).encode()


def metrics(run: str, role: str, node: str, **body: Any) -> tuple[str, bytes]:
    return f"emo/{run}/telemetry/metrics/{role}/{node}", json.dumps(body).encode()


# ----------------------------------------------------------------------- pure state
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def fleet() -> FleetState:
    state = FleetState(clock=Clock())
    for message in [
        status("q-emo", "server", "server"),
        status("q-emo", "device", "dev0"),
        status("q-emo", "device", "dev1"),
        status("q-emo", "overlay", "ovl0"),
        metrics(
            "q-emo",
            "device",
            "dev0",
            round=1,
            bytes_out_by_kind={"weights": 100, "activations": 50},
            rejected={"bad_payload": 0},
            decision={"fraction": 0.5, "precision": "fp16", "interval": 2},
            activation_bytes=50,
        ),
        metrics(
            "q-emo",
            "overlay",
            "ovl0",
            round=1,
            loss=float("nan"),
            bytes_out_by_kind={"weights": 1000},
            cache={"entries": 10, "capacity": 100, "bytes": 640, "mean_staleness": 0.5},
        ),
        metrics(
            "q-emo",
            "server",
            "server",
            event="round",
            round=1,
            accuracy=0.5,
            fl_accuracy=0.4,
            updates=2,
            wall_s=1.0,
            bytes_out_by_kind={"weights": 10},
            rejected={"duplicate": 3},
        ),
        status("q-emo", "device", "dev1", "offline"),
        status("q-fl", "server", "server"),
        metrics("q-fl", "server", "server", event="round", round=1, accuracy=0.3, fl_accuracy=0.3),
    ]:
        assert state.ingest(*message)
    return state


def test_fleet_state_snapshot() -> None:
    snap = fleet().snapshot()
    json.dumps(snap, allow_nan=False)  # strict JSON: browsers reject NaN
    assert list(snap["runs"]) == ["q-fl", "q-emo"], "most recently active run first"
    run = snap["runs"]["q-emo"]
    assert run["online"] == {"device": 1, "overlay": 1, "server": 1}
    assert run["total"] == {"device": 2, "overlay": 1, "server": 1}
    assert (run["online_count"], run["node_count"]) == (3, 4)
    assert run["accuracy"] == [
        {
            "round": 1,
            "accuracy": 0.5,
            "fl_accuracy": 0.4,
            "wall_s": 1.0,
            "updates": 2.0,
            "missing": [],
        }
    ]
    assert run["latest_accuracy"] == 0.5 and not run["done"]
    assert run["bytes_by_kind"] == {"activations": 50, "weights": 1110}
    assert run["bytes"][-1]["by_kind"] == run["bytes_by_kind"]
    assert [s["t"] for s in run["bytes"]] == sorted(s["t"] for s in run["bytes"])
    assert run["cache"]["ovl0"]["entries"] == 10 and run["cache"]["ovl0"]["loss"] is None
    assert run["decisions"]["dev0"]["fraction"] == 0.5
    assert run["decisions"]["dev0"]["precision"] == "fp16"
    assert run["rejected"] == {"duplicate": 3}
    kinds = {(a["kind"], a["run"], a["message"]) for a in snap["alerts"]}
    assert kinds == {
        ("offline", "q-emo", "1 node is offline: device/dev1"),
        ("rejected", "q-emo", "3 input(s) rejected: duplicate"),
    }


def test_fleet_state_done_and_restart() -> None:
    state = fleet()
    state.ingest(
        *metrics(
            "q-emo", "server", "server", event="done", accuracy=0.8658, fl_accuracy=0.7, rounds=1
        )
    )
    run = state.snapshot()["runs"]["q-emo"]
    assert run["done"] and run["latest_accuracy"] == 0.8658
    offline = [a for a in state.snapshot()["alerts"] if a["kind"] == "offline"]
    assert offline == [], "nodes leaving a finished run are not alerts"
    # The same run id started again (emo run clears and reruns): history starts over.
    state.ingest(*status("q-emo", "server", "server"))
    run = state.snapshot()["runs"]["q-emo"]
    assert not run["done"] and run["accuracy"] == [] and run["node_count"] == 4


def test_fleet_state_never_raises() -> None:
    state = FleetState()
    assert not state.ingest("emo/r1/telemetry/status/device/d0", b"")  # cleared retained topic
    assert not state.ingest("emo/r1/telemetry/status/device/d0", b"{not json")
    assert not state.ingest("emo/r1/telemetry/status/device/d0", b"[1, 2]")
    assert not state.ingest("emo/r1/telemetry/metrics/device/d0", b"\xff\xfe")
    assert not state.ingest("emo/r1/server/round", b"{}")  # not a dashboard topic
    assert not state.ingest("other/topic", b"{}")
    assert not state.ingest("emo/r1/telemetry/status/wizard/d0", b"{}")  # unknown role
    # Wrong types in known fields: the message is skipped, not half taken.
    for wrong in (
        {"round": "x"},
        {"bytes_out_by_kind": [1]},
        {"rejected": {"a": "many"}},
        {"rejected": {"b": -1}},
        {"cache": None},
    ):
        assert not state.ingest(*metrics("r1", "device", "d0", **wrong))
    # Unknown fields and wrong values inside known objects are the consumer's to clean.
    assert state.ingest(
        *metrics(
            "r1",
            "device",
            "d0",
            rejected={"c": 2},
            hue="blue",
            decision={"fraction": "half"},
            loss=float("nan"),
        )
    )
    assert (state.malformed, state.ignored, state.messages) == (8, 3, 1)
    assert state.malformed_by_reason == {
        "bad_json": 1,
        "not_object": 1,
        "not_utf8": 1,
        "bad_field": 5,
    }
    snap = state.snapshot()
    json.dumps(snap, allow_nan=False)
    assert snap["runs"]["r1"]["rejected"] == {"c": 2}
    assert snap["runs"]["r1"]["decisions"]["d0"]["fraction"] is None
    assert snap["malformed_by_reason"]["bad_field"] == 5


def test_prometheus_text() -> None:
    text = prometheus_text(fleet().snapshot())
    lines = set(text.splitlines())
    assert 'emo_nodes_online{run="q-emo",role="device"} 1' in lines
    assert 'emo_nodes_known{run="q-emo",role="device"} 2' in lines
    assert 'emo_accuracy{run="q-emo"} 0.5' in lines
    assert 'emo_bytes_total{run="q-emo",kind="weights"} 1110' in lines
    assert 'emo_rejected_total{run="q-emo",reason="duplicate"} 3' in lines
    assert "# TYPE emo_bytes_total counter" in lines
    sample = re.compile(r'^[a-z_]+(\{([a-z]+="[^"\\]*",?)+\})? [0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    odd = prometheus_text({"runs": {'a"b\\c': {"online": {"x\ny": 1}}}})
    assert 'emo_nodes_online{run="a\\"b\\\\c",role="x\\ny"} 1' in odd


# ----------------------------------------------------------------------- HTTP server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw ``request``, read the whole response: status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        writer.write_eof()  # all sent: a truncated request is seen as such at once
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@contextlib.asynccontextmanager
async def dashboard(broker: str, port: int) -> AsyncIterator[None]:
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_dashboard(broker, port=port, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ready.is_set(), "the dashboard did not come up"
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def wait_for_state(port: int, check: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, _, body = await get(port, "/api/state")
        assert code == 200
        state: dict[str, Any] = json.loads(body)
        if check(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)


@pytest.mark.broker
async def test_http_endpoints(mosquitto: BrokerHandle) -> None:
    port = free_port()
    run = f"dash-http-{os.getpid()}"
    async with (
        dashboard(mosquitto.url, port),
        open_bus(mosquitto.url, f"dash-test-{os.getpid()}", clean_start=True) as bus,
    ):
        # SSE: the first event is the current snapshot.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"200 OK" in head and b"text/event-stream" in head

        for message in [
            status(run, "server", "server"),
            status(run, "device", "d0"),
            metrics(
                run,
                "server",
                "server",
                event="round",
                round=1,
                accuracy=0.75,
                fl_accuracy=0.7,
                bytes_out_by_kind={"weights": 123},
            ),
            (f"emo/{run}/telemetry/metrics/device/d0", b"{broken"),
        ]:
            await bus.publish(*message, retain=message[0].split("/")[2] == "status")
        state = await wait_for_state(
            port, lambda s: run in s["runs"] and s["malformed"] >= 1 and s["runs"][run]["accuracy"]
        )
        assert state["connected"] and state["broker"] == mosquitto.url
        assert state["runs"][run]["online_count"] == 2
        assert state["runs"][run]["latest_accuracy"] == 0.75

        # The SSE stream caught up with the same state.
        seen: dict[str, Any] = {}
        while not seen.get("runs", {}).get(run, {}).get("accuracy"):
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.startswith(b"data: "):
                seen = json.loads(line[6:])
        writer.close()

        code, headers, body = await get(port, "/metrics")
        assert code == 200 and headers["content-type"].startswith("text/plain")
        assert f'emo_accuracy{{run="{run}"}} 0.75'.encode() in body
        assert f'emo_bytes_total{{run="{run}",kind="weights"}} 123'.encode() in body

        code, headers, body = await get(port, "/")
        assert code == 200 and headers["content-type"].startswith("text/html")
        assert b'id="node-count"' in body and b'id="initial-state"' in body
        assert b"http://" not in body.replace(b"http://www.w3.org", b""), "no CDN"
        code, headers, body = await get(port, "/static/app.js")
        assert code == 200 and b"EventSource" in body
        assert (await get(port, "/static/style.css"))[0] == 200
        code, _, _ = await http(port, b"HEAD /api/state HTTP/1.1\r\n\r\n")
        assert code == 200

        for path in (
            "/nope",
            "/static/",
            "/static/../server.py",
            "/static/..%2fserver.py",
            "/static/__init__.py",
            "/api/state/x",
        ):
            assert (await get(port, path))[0] == 404, path
        assert (await http(port, b"GARBAGE\r\n\r\n"))[0] == 400
        assert (await http(port, b"GET nothing HTTP/1.1\r\n\r\n"))[0] == 400
        assert (await http(port, b"\xff\xfe / HTTP/1.1\r\n\r\n"))[0] == 400
        assert (await http(port, b"POST / HTTP/1.1\r\n\r\n"))[0] == 405
        big = b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
        assert (await http(port, big))[0] == 431
        assert (await http(port, b"GET / HTTP/1.1\r\n"))[0] == 400  # closed mid-head
        # Still serving after all that.
        assert (await get(port, "/api/state"))[0] == 200
        for topic, _ in [status(run, "server", "server"), status(run, "device", "d0")]:
            await bus.publish(topic, b"", retain=True)


# ----------------------------------------------------------------------- the browser
SHORT_RUN = {
    "run": {
        "name": "dash",
        "id": "dash",  # a fixed run id: the test reads topics emo/dash-emo/...
        "seed": 3,
        "rounds": 2,
        "algorithms": ["fl", "emo"],
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


async def chromium(url: str, tmp: Path, *extra: str) -> str:
    """Open ``url`` in headless Chromium; its stdout.

    ``--timeout`` rather than ``--virtual-time-budget``: with a virtual time budget,
    Chromium pauses virtual time while a request is pending, and the page's EventSource
    request never ends, so the capture would never come. The page inlines the state it was
    served with, so what it shows at load time is deterministic.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(CHROMIUM_MISSING, pytrace=False)
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'profile'}",
        "--timeout=15000",
        *extra,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def element_text(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert found, f"no #{element_id} in the page"
    return found.group(1).strip()


@pytest.mark.broker
async def test_dashboard_in_chromium(mosquitto: BrokerHandle, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(CHROMIUM_MISSING, pytrace=False)
    port = free_port()
    config = from_dict(SHORT_RUN)
    lines: list[str] = []
    async with dashboard(mosquitto.url, port):
        summary = await run_scenario(mosquitto.url, config, None, say=lines.append)
        emo = summary["algorithms"]["emo"]
        expected = f"dash-emo {emo['accuracy']:.4f}"
        await wait_for_state(port, lambda s: s["runs"].get("dash-emo", {}).get("done"))

        dom = await chromium(f"http://127.0.0.1:{port}/", tmp_path, "--dump-dom")
        # The run last active is shown: EMO with its server, 4 devices and 2 overlays,
        # all gone offline cleanly at the end of the run.
        assert element_text(dom, "node-total") == "7", dom[:3000]
        assert element_text(dom, "node-count") == "0"
        # A finished run says so; its nodes are done (grey), not failed (red).
        assert element_text(dom, "run-state") == "finished: 2/2 rounds"
        assert dom.count('data-state="done"') == 7 and 'data-state="offline"' not in dom
        # Nodes leaving a finished run are not alerts. (A rejected input may be: with
        # min_updates 2 of 4, a device that is late under load sends an update after its
        # round closed, and that is counted, and shown, as it should be.)
        alerts = re.search(r'id="alerts"[^>]*>(.*?)</ul>', dom, re.S)
        assert alerts, "no #alerts in the page"
        shown = re.findall(r"<li[^>]*>([^<]*)</li>", alerts.group(1))
        assert shown == ["no alerts"] or all("rejected" in a for a in shown), shown
        assert element_text(dom, "latest-accuracy") == expected
        # The big-fleet view: counts by state, the two sites, the last round's stragglers.
        counts = re.search(r'id="state-counts".*?</table>', dom, re.S)
        assert counts and "<td>device</td><td>0</td><td>4</td><td>0</td>" in counts.group(0)
        sites = re.search(r'id="sites".*?</table>', dom, re.S)
        assert sites and sites.group(0).count("<tr>") == 3  # head + ovl0 + ovl1
        assert "<td>ovl0</td><td>2</td>" in sites.group(0)
        assert "round 2 closed" in element_text(dom, "stragglers")
        assert 'id="search"' in dom
        assert not re.search(r'id="controller-card"[^>]*hidden', dom), "EMO has a controller"
        fl_dom = await chromium(f"http://127.0.0.1:{port}/?run=dash-fl", tmp_path, "--dump-dom")
        assert re.search(r'id="controller-card"[^>]*hidden', fl_dom), "FedAvg has none"
        assert element_text(fl_dom, "run-state") == "finished: 2/2 rounds"
        code, _, found = await get(port, "/api/search?run=dash-emo&q=dev01")
        hit = json.loads(found)["results"][0]
        assert code == 200 and (hit["id"], hit["site"], hit["state"]) == (
            "dev01",
            "ovl1",
            "offline",
        )
        assert not math.isnan(emo["accuracy"])
        assert "dash-fl" in dom and "<svg" in dom  # FedAvg's accuracy line beside EMO's
        assert "no overlay in this run" not in dom

        shot = tmp_path / "dash.png"
        await chromium(
            f"http://127.0.0.1:{port}/",
            tmp_path,
            f"--screenshot={shot}",
            "--window-size=1280,1000",
            "--hide-scrollbars",
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("EMO_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "dashboard.png")


@pytest.mark.broker
async def test_broker_loss_is_shown_and_survived(fresh_mosquitto: BrokerHandle) -> None:
    port = free_port()
    async with dashboard(fresh_mosquitto.url, port):
        state = await wait_for_state(port, lambda s: s["connected"])
        assert state["connected"]
        fresh_mosquitto.stop()
        state = await wait_for_state(port, lambda s: not s["connected"])
        assert not state["connected"], "the page says when the broker is gone"
        assert (await get(port, "/"))[0] == 200, "and the page is still served"
        fresh_mosquitto.start()
        async with open_bus(fresh_mosquitto.url, "dash-loss", clean_start=True) as bus:
            await bus.publish(*status("dash-loss", "server", "server"), retain=True)
        state = await wait_for_state(port, lambda s: "dash-loss" in s["runs"], timeout=15)
        assert state["connected"] and "dash-loss" in state["runs"], "it subscribed again"
