"""Run-level views of the dashboard: lifecycle, alerts, big-fleet counts, stragglers, search.

Pure functions of a :class:`~emo_mqtt.dashboard.state.RunState` (no asyncio, no MQTT, no
I/O). A run is shown as what it is: ``live`` (round k of N), ``finished``, ``interrupted``
(the server said so when it stopped early) or ``lost`` (its server went offline without
saying either: killed, or its machine died). Alerts are one per run-level event, not one
per node: a run of 1,000 devices that loses 30 gets one line naming the first few.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.errors import ConfigError

if TYPE_CHECKING:
    from emo_mqtt.dashboard.state import RunState

#: Node ids named in one alert line at most (the rest are counted).
ALERT_NAMES = 5
#: Stragglers a snapshot lists at most (the rest are counted).
MAX_STRAGGLERS = 100
#: Search results returned at most.
MAX_RESULTS = 20
STATES = ("online", "offline", "unknown")


def lifecycle(run: RunState) -> dict[str, Any]:
    """``{"state", "round", "closed", "rounds", "label"}`` of ``run``.

    From the server's retained run state when there is one (any dashboard opened at any
    time gets it), else from what the metrics said (a ``done`` event: finished).
    """
    lc = run.lifecycle
    rounds = lc["rounds"] if lc else 0
    closed = lc["closed"] if lc else (max(run.rounds) if run.rounds else 0)
    current = lc["round"] if lc else run.round
    if run.final is not None or (lc is not None and lc["state"] == "finished"):
        state = "finished"
    elif lc is not None and lc["state"] == "interrupted":
        state = "interrupted"
    else:
        servers = run.nodes.get("server", {})
        gone = bool(servers) and all(n["state"] == "offline" for n in servers.values())
        state = "lost" if gone else "live"
    of = f"/{rounds}" if rounds else ""
    label = {
        "finished": f"finished: {closed}{of} rounds",
        "interrupted": f"interrupted at round {closed}{of}",
        "lost": f"server offline at round {closed}{of}, without finishing",
        "live": f"live: round {current}{of}" if current else "live: starting",
    }[state]
    return {"state": state, "round": current, "closed": closed, "rounds": rounds, "label": label}


def has_controller(run: RunState) -> bool:
    """Whether the run's algorithm has a convergence controller (else: no controller panel)."""
    if run.lifecycle is not None and isinstance(run.lifecycle.get("controller"), bool):
        return bool(run.lifecycle["controller"])
    if run.algorithm is None:
        return False
    try:
        return Algorithm.parse(run.algorithm).controlled
    except ConfigError:
        return False


def _names(ids: list[str]) -> str:
    shown = ", ".join(ids[:ALERT_NAMES])
    return shown + (f" and {len(ids) - ALERT_NAMES} more" if len(ids) > ALERT_NAMES else "")


def _alert(run: RunState, level: str, kind: str, message: str) -> dict[str, Any]:
    return {
        "run": run.name,
        "level": level,
        "kind": kind,
        "node": None,
        "time": run.last_seen,
        "message": message,
    }


def alerts(run: RunState, lc: dict[str, Any]) -> list[dict[str, Any]]:
    """One alert per run-level event: interrupted, lost, nodes offline (live runs only:
    at the end of a run every node goes offline, as it should), inputs rejected."""
    out: list[dict[str, Any]] = []
    if lc["state"] == "interrupted":
        out.append(_alert(run, "warning", "interrupted", lc["label"]))
    elif lc["state"] == "lost":
        out.append(_alert(run, "error", "lost", lc["label"]))
    elif lc["state"] == "live":
        offline = sorted(
            f"{role}/{node}"
            for role, nodes in run.nodes.items()
            for node, status in nodes.items()
            if status["state"] == "offline"
        )
        if offline:
            many = "node is" if len(offline) == 1 else "nodes are"
            text = f"{len(offline)} {many} offline: {_names(offline)}"
            out.append(_alert(run, "warning", "offline", text))
    for reason, count in run.rejected().items():
        out.append(_alert(run, "warning", "rejected", f"{count} input(s) rejected: {reason}"))
    return out


def state_counts(run: RunState) -> dict[str, dict[str, int]]:
    """role -> {online, offline, unknown}: counts of nodes by their last status."""
    out: dict[str, dict[str, int]] = {}
    for role, nodes in sorted(run.nodes.items()):
        counts = dict.fromkeys(STATES, 0)
        for status in nodes.values():
            counts[status["state"] if status["state"] in counts else "unknown"] += 1
        out[role] = counts
    return out


def stragglers(run: RunState, lc: dict[str, Any]) -> dict[str, Any]:
    """The devices sampled in the open round that have not sent their update yet.

    A device publishes its metrics (with the round) right after its update, so "has sent"
    is "reported that round". Between rounds (or after the run) the list is the last
    closed round's missing devices, with ``open`` false.
    """
    sampled = run.lifecycle["sampled"] if run.lifecycle else []
    if lc["state"] == "live" and lc["round"] > lc["closed"] and sampled:
        r = lc["round"]
        waiting = sorted(d for d in sampled if run.trained.get(d, 0) < r)
        return {
            "round": r,
            "open": True,
            "sampled": len(sampled),
            "count": len(waiting),
            "devices": waiting[:MAX_STRAGGLERS],
        }
    last = run.rounds.get(lc["closed"]) if lc["closed"] else None
    missing = sorted(last.get("missing") or []) if last else []
    return {
        "round": lc["closed"],
        "open": False,
        "sampled": None,
        "count": len(missing),
        "devices": missing[:MAX_STRAGGLERS],
    }


def sites(run: RunState, lc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per overlay (a site: an overlay's group of devices), device counts by state and how
    many of them trained the current round."""
    layout: dict[str, list[str]] = run.lifecycle["layout"] if run.lifecycle else {}
    devices = run.nodes.get("device", {})
    sampled = set(run.lifecycle["sampled"]) if run.lifecycle else set()
    out = []
    for overlay, ids in sorted(layout.items()):
        counts = dict.fromkeys(STATES, 0)
        trained = waiting = 0
        for device in ids:
            state = devices.get(device, {}).get("state", "unknown")
            counts[state if state in counts else "unknown"] += 1
            if lc["round"] and run.trained.get(device, 0) >= lc["round"]:
                trained += 1
            elif device in sampled and lc["state"] == "live" and lc["round"] > lc["closed"]:
                waiting += 1
        out.append(
            {"site": overlay, "devices": len(ids), **counts, "trained": trained, "waiting": waiting}
        )
    return out


def search(run: RunState, query: str, limit: int = MAX_RESULTS) -> dict[str, Any]:
    """Nodes of ``run`` whose id (or ``role/id``) contains ``query``; exact matches first."""
    q = query.strip().lower()[:64]
    overlay_of: dict[str, str] = run.lifecycle["overlay_of"] if run.lifecycle else {}
    sampled = set(run.lifecycle["sampled"]) if run.lifecycle else set()
    hits: list[tuple[int, str, str, dict[str, Any]]] = []
    count = 0
    if q:
        for role, nodes in run.nodes.items():
            for node, status in nodes.items():
                key = f"{role}/{node}".lower()
                if q in key:
                    count += 1
                    hits.append((0 if q in (node.lower(), key) else 1, role, node, status))
    hits.sort(key=lambda h: (h[0], h[1], h[2]))
    results = [
        {
            "role": role,
            "id": node,
            "state": status["state"],
            "round": status["round"],
            "version": status["version"],
            "time": status["time"],
            "trained_round": run.trained.get(node) if role == "device" else None,
            "site": overlay_of.get(node) if role == "device" else None,
            "sampled": node in sampled if role == "device" else None,
            "bytes_out_by_kind": run.node_bytes.get(f"{role}/{node}", {}),
        }
        for _, role, node, status in hits[:limit]
    ]
    return {"run": run.name, "query": q, "count": count, "results": results}
