"""The dashboard at 1,000 devices: page load time and update latency in headless Chromium.

A real Mosquitto (started here on a free port), the real dashboard (``emo dashboard``, its
own process, as users run it) subscribed to it, and a synthetic fleet: a server,
``--devices`` devices and ``--overlays`` overlays publish their retained statuses and a live
run state (round 1, ``--sampled`` devices sampled) over MQTT. Debian's Chromium opens the
page headless and is driven over the DevTools protocol (the ``websockets`` package) to
measure:

- **load**: navigation start to the load event (the page, its script, the inlined
  snapshot parsed and rendered once), and the first render's own duration;
- **update latency**: from publishing one device's metrics (a straggler sends its update)
  to the page having rendered the snapshot that shows it (``window.emoPerf``, stamped with
  ``Date.now()`` after rendering, on this machine's clock), ``--updates`` times;
- **a round's burst**: every sampled device's metrics at once, until the page says all
  sampled devices are in, and the render times meanwhile (is the page still responsive?);
- the pure state's ``snapshot()`` time and the snapshot's size.

Not a pass/fail test (figures go to docs/performance.md). Run:
``python benchmarks/dashboard_scale.py --devices 1000``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets

from emo_mqtt.broker.launch import BrokerHandle, find_free_port
from emo_mqtt.bus import open_bus
from emo_mqtt.dashboard.state import FleetState
from emo_mqtt.topics import Kind, topic

CHROMIUM = "/usr/bin/chromium"
RUN = "scale"


def _status(role: str, node: str) -> tuple[str, bytes]:
    body = {"state": "online", "role": role, "id": node, "run": RUN, "round": 1, "time": 1.0}
    return topic(Kind.STATUS, RUN, node=node, role=role), json.dumps(body).encode()


def _metrics(node: str, r: int) -> tuple[str, bytes]:
    body = {
        "role": "device",
        "id": node,
        "run": RUN,
        "round": r,
        "final": False,
        "algorithm": "emo",
        "bytes_out_by_kind": {"weights": 24_000 * r, "activations": 90_000 * r, "status": 130},
        "rejected": {},
        "decision": {"fraction": 0.5, "precision": "int8", "interval": 1},
        "activation_bytes": 90_000 * r,
    }
    return topic(Kind.METRICS, RUN, node=node, role="device"), json.dumps(body).encode()


def _run_state(devices: list[str], overlays: int, sampled: list[str]) -> tuple[str, bytes]:
    body = {
        "state": "live",
        "run": RUN,
        "algorithm": "emo",
        "incarnation": "0000000000000001-abcdef",
        "controller": True,
        "overlays": True,
        "round": 1,
        "closed": 0,
        "rounds": 3,
        "sampled": sampled,
        "history": [],
        "final": None,
        "layout": {f"ovl{k}": devices[k::overlays] for k in range(overlays)},
        "time": time.time(),
    }
    return topic(Kind.RUN_STATE, RUN), json.dumps(body).encode()


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        mine = next(self.ids)
        await self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == mine:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    async def eval(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out.get("result", {}).get("value")


async def _chromium(profile: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    for _ in range(600):
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError("Chromium did not open its DevTools port")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _page_ws(port: int) -> str:
    targets = _get_json(f"http://127.0.0.1:{port}/json/list")
    return str(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])


async def _wait_js(page: Page, expression: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await page.eval(expression)
        if value:
            return value
        await asyncio.sleep(0.005)
    raise TimeoutError(expression)


def _pure_snapshot_ms(devices: int, overlays: int, sampled: int) -> tuple[float, int]:
    state = FleetState()
    ids = [f"dev{i:04d}" for i in range(devices)]
    state.ingest(*_status("server", "server"))
    for d in ids:
        state.ingest(*_status("device", d))
        state.ingest(*_metrics(d, 1))
    state.ingest(*_run_state(ids, overlays, ids[:sampled]))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        snap = state.snapshot()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), len(json.dumps(snap))


async def bench(devices: int, overlays: int, sampled: int, updates: int) -> dict[str, Any]:
    ids = [f"dev{i:04d}" for i in range(devices)]
    tmp = Path(tempfile.mkdtemp(prefix="emo-dash-bench-"))
    out: dict[str, Any] = {"devices": devices, "overlays": overlays, "sampled": sampled}
    with BrokerHandle(kind="mosquitto", workdir=tmp / "broker") as broker:
        port = find_free_port()
        dash = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "emo"),
            "dashboard",
            "--broker",
            broker.url,
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
        )
        assert dash.stdout is not None
        line = await asyncio.wait_for(dash.stdout.readline(), 60)  # "dashboard: http://..."
        assert line.startswith(b"dashboard:"), line
        async with open_bus(broker.url, "bench-fleet", clean_start=True) as bus:
            await bus.publish(*_status("server", "server"), retain=True)
            for d in ids:
                await bus.publish(*_status("device", d), retain=True)
            for k in range(overlays):
                await bus.publish(*_status("overlay", f"ovl{k}"), retain=True)
            await bus.publish(*_run_state(ids, overlays, ids[:sampled]), retain=True)
            want = devices + overlays + 2
            for _ in range(600):
                snap = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/api/state")
                if snap["messages"] >= want:
                    break
                await asyncio.sleep(0.05)
            proc, dev_port = await _chromium(tmp / "profile")
            try:
                ws_url = await asyncio.to_thread(_page_ws, dev_port)
                async with websockets.connect(ws_url, max_size=None) as ws:
                    page = Page(ws)
                    await page.call("Page.enable")
                    await page.call("Runtime.enable")
                    loads, first_render = [], []
                    for _ in range(5):
                        await page.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
                        await _wait_js(
                            page,
                            "document.readyState === 'complete' && "
                            "performance.getEntriesByType('navigation')[0].loadEventEnd > 0",
                        )
                        nav = await page.eval(
                            "JSON.stringify(performance.getEntriesByType('navigation')[0])"
                        )
                        loads.append(json.loads(nav)["loadEventEnd"])
                        first_render.append(await page.eval("emoPerf.renders[0].render_ms"))
                    out["load_ms"] = statistics.median(loads)
                    out["load_ms_all"] = [round(x, 1) for x in loads]
                    out["first_render_ms"] = statistics.median(first_render)
                    text = await page.eval("document.getElementById('stragglers').textContent")
                    out["stragglers_text"] = text[:80]
                    # Wait for the SSE stream to be live (its first push renders once more).
                    await _wait_js(page, "emoPerf.renders.length >= 2")
                    lat = []
                    for k in range(min(updates, sampled)):
                        await asyncio.sleep(0.3)  # past the server's 0.25 s push spacing
                        n = await page.eval("emoPerf.renders.length")
                        t0 = time.time()
                        await bus.publish(*_metrics(ids[k], 1))
                        waiting = sampled - k - 1
                        probe = (
                            f"document.getElementById('stragglers').textContent"
                            f".includes('waiting for {waiting} of')"
                            if waiting
                            else "document.getElementById('stragglers').textContent"
                            ".includes('all ')"
                        )
                        await _wait_js(page, probe)
                        at = await page.eval(f"emoPerf.renders.slice({n}).map(r => r.at)")
                        lat.append((min(a for a in at if a >= t0) - t0) * 1000)
                    out["update_latency_ms"] = {
                        "median": statistics.median(lat),
                        "max": max(lat),
                        "n": len(lat),
                    }
                    # A round's burst: all the other sampled devices at once.
                    n = await page.eval("emoPerf.renders.length")
                    t0 = time.time()
                    for d in ids[len(lat) : sampled]:
                        await bus.publish(*_metrics(d, 1))
                    await _wait_js(
                        page,
                        "document.getElementById('stragglers').textContent.includes('all ')",
                        timeout=60,
                    )
                    renders = await page.eval(f"emoPerf.renders.slice({n})")
                    out["burst"] = {
                        "messages": sampled - len(lat),
                        "publish_to_all_shown_ms": (max(r["at"] for r in renders) - t0) * 1000,
                        "renders": len(renders),
                        "render_ms_median": statistics.median(r["render_ms"] for r in renders),
                        "render_ms_max": max(r["render_ms"] for r in renders),
                    }
            finally:
                proc.terminate()
                await proc.wait()
        dash.terminate()
        await dash.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    snap_ms, snap_bytes = _pure_snapshot_ms(devices, overlays, sampled)
    out["snapshot_ms"] = snap_ms
    out["snapshot_bytes"] = snap_bytes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--overlays", type=int, default=10)
    parser.add_argument("--sampled", type=int, default=100)
    parser.add_argument("--updates", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(bench(args.devices, args.overlays, args.sampled, args.updates))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
