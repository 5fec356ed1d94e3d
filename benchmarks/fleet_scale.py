"""Scale of ``emo run``: fleets of 10 to 5,000 (or 10,000) devices, one MQTT connection each.

For each fleet size, runs ``emo run scenarios/fleet1000.toml --set fleet.devices=N`` (FL and
EMO, 3 rounds, 5 % of the devices sampled per round, 50 samples each) as a user would, as a
subprocess, against a Mosquitto started with the project's config (as ``emo run`` starts
it), and reports per algorithm:

* wall seconds of the whole ``emo run`` (both algorithms, start-up included) and of each
  algorithm (its summary's ``wall_s``: from its start, worker start-up and connecting
  included, to its end);
* seconds per round once the fleet is up (mean gap between round closes, from the summary's
  ``time_per_round_s``) and the start-up before round 1;
* peak RSS of the ``emo`` process tree (launcher plus workers, sampled every 0.25 s) and of
  the broker;
* peak broker connections (established TCP connections to the broker's port, /proc/net/tcp);
* messages published per second by the fleet's nodes (the rows of messages.csv over the
  algorithm's wall time; the broker delivers more: a round goes to every device).

Linux only (/proc). Usage::

    python benchmarks/fleet_scale.py                         # 10, 100, 1,000, 5,000
    python benchmarks/fleet_scale.py --devices 10000 --set data.min_samples_per_device=5 \\
        --set data.samples_per_device=5
    python benchmarks/fleet_scale.py --devices 1000 --workers 0    # all in one process
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from emo_mqtt.broker.launch import BrokerHandle, raise_open_files_limit

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "fleet1000.toml"


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/<pid>/stat's parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _connections(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the broker's side)."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


class Sampler(threading.Thread):
    """Peak RSS of a process tree and of the broker, and peak broker connections."""

    def __init__(self, root: int, broker_pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.root, self.broker_pid, self.port = root, broker_pid, port
        self.peak_tree_kib = self.peak_broker_kib = self.peak_connections = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            tree = sum(_rss_kib(p) for p in _tree(self.root) if p != self.broker_pid)
            self.peak_tree_kib = max(self.peak_tree_kib, tree)
            self.peak_broker_kib = max(self.peak_broker_kib, _rss_kib(self.broker_pid))
            self.peak_connections = max(self.peak_connections, _connections(self.port))


def run_one(broker: BrokerHandle, devices: int, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"emo-fleet-{devices}-"))
    command = [
        str(Path(sys.executable).with_name("emo")),
        "run",
        str(SCENARIO),
        "--broker",
        broker.url,
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        "--json",
        "--set",
        f"fleet.devices={devices}",
        "--set",
        # One overlay per 100 devices, 1 to 10: with 5 % sampled, each overlay has sampled
        # devices (an overlay that never gets activations holds up the run's end by
        # round_deadline_s, a known limit of the server's final wait).
        f"fleet.overlays={min(10, max(1, devices // 100))}",
        "--set",
        "fleet.min_updates=1",
        "--rounds",
        str(args.rounds),
    ]
    for setting in args.set:
        command += ["--set", setting]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    began = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert broker.pid is not None
    sampler = Sampler(proc.pid, broker.pid, broker.port)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=args.timeout)
    wall = time.monotonic() - began
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{devices} devices: emo run failed ({proc.returncode}):\n{stderr}")
    summary = json.loads(stdout)
    rows: dict[str, Any] = {}
    for name, entry in summary["algorithms"].items():
        times = entry["time_per_round_s"]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        with (out / name / "messages.csv").open() as f:
            messages = sum(1 for _ in csv.reader(f)) - 1
        rows[name] = {
            "wall_s": entry["wall_s"],
            "first_round_s": times[0] if times else None,
            "s_per_round": sum(gaps) / len(gaps) if gaps else None,
            "messages": messages,
            "messages_per_s": messages / entry["wall_s"],
            "accuracy": entry["accuracy"],
        }
    return {
        "devices": devices,
        "total_s": wall,
        "peak_rss_mib": sampler.peak_tree_kib / 1024,
        "broker_rss_mib": sampler.peak_broker_kib / 1024,
        "peak_connections": sampler.peak_connections,
        "algorithms": rows,
        "out": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--workers", type=int, help="emo run --workers (default: its own)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="passed to emo run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per fleet")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    raise_open_files_limit(needed=max(args.devices) + 100)
    results = []
    with BrokerHandle(kind="mosquitto") as broker:
        print(f"broker: {broker.describe()}; load: {os.getloadavg()}", flush=True)
        print(
            "| devices | algorithm | total s | algorithm s | to round 1 s | s/round "
            "| peak RSS MiB (emo + broker) | broker connections | msgs published/s | accuracy |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for devices in args.devices:
            result = run_one(broker, devices, args)
            results.append(result)
            for name, row in result["algorithms"].items():
                per_round = row["s_per_round"]
                print(
                    f"| {devices:,} | {name} | {result['total_s']:.0f} | {row['wall_s']:.1f} "
                    f"| {row['first_round_s']:.1f} "
                    f"| {'-' if per_round is None else f'{per_round:.1f}'} "
                    f"| {result['peak_rss_mib']:,.0f} + {result['broker_rss_mib']:,.0f} "
                    f"| {result['peak_connections']:,} | {row['messages_per_s']:.0f} "
                    f"| {row['accuracy']:.3f} |",
                    flush=True,
                )
    print(f"load after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
