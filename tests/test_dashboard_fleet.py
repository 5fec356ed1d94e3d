"""The dashboard's run-level views, through the pure state: lifecycles, one alert per run
event, a dashboard opened after the run, and the big-fleet view (counts by state and site,
stragglers, search) at 1,000 devices. No broker, no browser: fast."""

from __future__ import annotations

import json
from typing import Any

from emo_mqtt.dashboard.state import BIG_FLEET, FleetState
from emo_mqtt.topics import Kind, topic


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def status(run: str, role: str, node: str, state: str = "online") -> tuple[str, bytes]:
    body = {"state": state, "role": role, "id": node, "run": run, "round": 0, "time": 1.0}
    return topic(Kind.STATUS, run, node=node, role=role), json.dumps(body).encode()


def metrics(run: str, role: str, node: str, **body: Any) -> tuple[str, bytes]:
    return topic(Kind.METRICS, run, node=node, role=role), json.dumps(body).encode()


def run_state(run: str, state: str, **body: Any) -> tuple[str, bytes]:
    base: dict[str, Any] = {
        "state": state,
        "run": run,
        "algorithm": "emo",
        "incarnation": "0000000000000001-aaaaaa",
        "controller": True,
        "overlays": True,
        "round": 0,
        "closed": 0,
        "rounds": 4,
        "sampled": [],
        "history": [],
        "final": None,
        "layout": {},
        "time": 1.0,
    }
    return topic(Kind.RUN_STATE, run), json.dumps(base | body).encode()


def history(n: int) -> list[dict[str, Any]]:
    return [
        {"round": r, "accuracy": 0.5 + r / 100, "fl_accuracy": 0.5, "wall_s": r, "updates": 2}
        | {"missing": []}
        for r in range(1, n + 1)
    ]


def small(state: FleetState, run: str = "r-emo") -> None:
    """Server, 8 devices, 2 overlays: 11 nodes, as in the issue."""
    for message in [
        status(run, "server", "server"),
        *(status(run, "device", f"dev{i:02d}") for i in range(8)),
        *(status(run, "overlay", f"ovl{i}") for i in range(2)),
    ]:
        assert state.ingest(*message)


def go_offline(state: FleetState, run: str = "r-emo") -> None:
    for i in range(8):
        state.ingest(*status(run, "device", f"dev{i:02d}", "offline"))
    for i in range(2):
        state.ingest(*status(run, "overlay", f"ovl{i}", "offline"))
    state.ingest(*status(run, "server", "server", "offline"))


def test_interrupted_run_is_one_alert_not_eleven() -> None:
    state = FleetState(clock=Clock())
    small(state)
    state.ingest(*run_state("r-emo", "live", round=3, closed=2, history=history(2)))
    state.ingest(*run_state("r-emo", "interrupted", round=3, closed=2, history=history(2)))
    go_offline(state)
    snap = state.snapshot()
    run = snap["runs"]["r-emo"]
    assert run["lifecycle"]["state"] == "interrupted"
    assert run["lifecycle"]["label"] == "interrupted at round 2/4"
    assert [a["message"] for a in snap["alerts"]] == ["interrupted at round 2/4"]
    assert [p["round"] for p in run["accuracy"]] == [1, 2]


def test_live_run_offline_nodes_are_one_alert() -> None:
    state = FleetState(clock=Clock())
    small(state)
    state.ingest(*run_state("r-emo", "live", round=1))
    for i in (3, 5, 6, 7, 0, 1):
        state.ingest(*status("r-emo", "device", f"dev{i:02d}", "offline"))
    snap = state.snapshot()
    assert snap["runs"]["r-emo"]["lifecycle"]["label"] == "live: round 1/4"
    assert [a["message"] for a in snap["alerts"]] == [
        "6 nodes are offline: device/dev00, device/dev01, device/dev03, device/dev05, "
        "device/dev06 and 1 more"
    ]


def test_server_gone_without_a_word_is_lost() -> None:
    state = FleetState(clock=Clock())
    small(state)
    state.ingest(*run_state("r-emo", "live", round=2, closed=1))
    state.ingest(*status("r-emo", "server", "server", "offline"))  # its last will
    snap = state.snapshot()
    assert snap["runs"]["r-emo"]["lifecycle"]["state"] == "lost"
    assert [a["kind"] for a in snap["alerts"]] == ["lost"]


def test_finished_run_opened_later_shows_its_result() -> None:
    # What a dashboard started after the run receives: retained statuses (offline), the
    # retained final metrics of each node and the retained run state, in any order.
    state = FleetState(clock=Clock())
    state.ingest(
        *metrics(
            "r-fl",
            "device",
            "dev00",
            round=4,
            final=True,
            bytes_out_by_kind={"weights": 4000},
            algorithm="fl",
        )
    )
    final = {"accuracy": 0.71, "fl_accuracy": 0.71, "rounds": 4, "train_wall_s": 9.0}
    state.ingest(
        *run_state(
            "r-fl",
            "finished",
            algorithm="fl",
            controller=False,
            round=4,
            closed=4,
            history=history(4),
            final=final,
        )
    )
    go_offline(state, "r-fl")
    state.ingest(
        *metrics(
            "r-fl",
            "server",
            "server",
            round=4,
            final=True,
            bytes_out_by_kind={"weights": 9000, "metrics": 10},
        )
    )
    snap = state.snapshot()
    run = snap["runs"]["r-fl"]
    assert run["done"] and run["lifecycle"]["label"] == "finished: 4/4 rounds"
    assert run["latest_accuracy"] == 0.71 and len(run["accuracy"]) == 4
    assert run["bytes_by_kind"] == {"metrics": 10, "weights": 13000}
    assert snap["alerts"] == [], "nodes leaving a finished run are no alert"
    assert not run["has_controller"], "FedAvg shows no controller panel"


def test_rerun_under_the_same_id_starts_over() -> None:
    state = FleetState(clock=Clock())
    small(state)
    state.ingest(*run_state("r-emo", "finished", round=4, closed=4, history=history(4)))
    state.ingest(*run_state("r-emo", "live", incarnation="0000000000000002-bbbbbb"))
    run = state.snapshot()["runs"]["r-emo"]
    assert run["lifecycle"]["state"] == "live" and run["accuracy"] == []
    assert run["node_count"] == 11, "the nodes' statuses are kept"


def test_bytes_totals_follow_each_nodes_latest_counts() -> None:
    state = FleetState(clock=Clock())
    state.ingest(*metrics("r", "device", "a", bytes_out_by_kind={"weights": 5}))
    state.ingest(*metrics("r", "device", "b", bytes_out_by_kind={"weights": 7, "x": 1}))
    state.ingest(*metrics("r", "device", "a", bytes_out_by_kind={"weights": 50}))
    assert state.snapshot()["runs"]["r"]["bytes_by_kind"] == {"weights": 57, "x": 1}


def big_fleet(devices: int = 1000, overlays: int = 10) -> FleetState:
    state = FleetState(clock=Clock())
    ids = [f"dev{i:04d}" for i in range(devices)]
    layout = {f"ovl{k}": ids[k::overlays] for k in range(overlays)}
    state.ingest(*status("big", "server", "server"))
    for d in ids:
        state.ingest(*status("big", "device", d))
    for k in range(overlays):
        state.ingest(*status("big", "overlay", f"ovl{k}"))
    sampled = ids[:50]
    state.ingest(
        *run_state(
            "big", "live", round=3, closed=2, layout=layout, sampled=sampled, history=history(2)
        )
    )
    # 45 of the 50 sampled devices sent their round-3 update (and then their metrics).
    for d in sampled[:45]:
        state.ingest(
            *metrics("big", "device", d, round=3, final=False, bytes_out_by_kind={"weights": 100})
        )
    for d in ids[990:]:  # ten devices lost
        state.ingest(*status("big", "device", d, "offline"))
    return state


def test_big_fleet_view_counts_stragglers_and_search() -> None:
    state = big_fleet()
    snap = state.snapshot()
    run = snap["runs"]["big"]
    assert run["big"] and run["node_count"] == 1011 > BIG_FLEET
    assert run["nodes"] == {}, "no entry per node in a big fleet's snapshot"
    assert run["states"]["device"] == {"online": 990, "offline": 10, "unknown": 0}
    assert run["states"]["overlay"] == {"online": 10, "offline": 0, "unknown": 0}
    st = run["stragglers"]
    assert (st["round"], st["open"], st["sampled"], st["count"]) == (3, True, 50, 5)
    assert st["devices"] == [f"dev{i:04d}" for i in range(45, 50)]
    sites = {s["site"]: s for s in run["sites"]}
    assert len(sites) == 10 and all(s["devices"] == 100 for s in sites.values())
    assert sites["ovl0"]["offline"] == 1 and sites["ovl0"]["online"] == 99  # dev0990
    assert sum(s["trained"] for s in sites.values()) == 45
    assert sum(s["waiting"] for s in sites.values()) == 5
    assert sites["ovl5"]["waiting"] == 1 and sites["ovl5"]["trained"] == 4  # dev0045
    assert [a["message"] for a in snap["alerts"]] == [
        "10 nodes are offline: device/dev0990, device/dev0991, device/dev0992, "
        "device/dev0993, device/dev0994 and 5 more"
    ]
    found = state.search("big", "dev0042")
    assert found["count"] == 1
    hit = found["results"][0]
    assert (hit["id"], hit["site"], hit["sampled"], hit["trained_round"]) == (
        "dev0042",
        "ovl2",
        True,
        3,
    )
    assert hit["bytes_out_by_kind"] == {"weights": 100}
    many = state.search("big", "dev00")
    assert many["count"] == 100 and len(many["results"]) == 20
    assert state.search("big", "")["count"] == 0
    assert state.search("nope", "dev")["results"] == []
    assert len(json.dumps(snap)) < 60_000, "the page's snapshot stays small"


def test_closed_round_lists_its_missing_devices() -> None:
    state = big_fleet()
    record = history(3)
    record[-1]["missing"] = ["dev0047", "dev0045"]
    state.ingest(
        *run_state(
            "big",
            "live",
            round=3,
            closed=3,
            history=record,
            sampled=[f"dev{i:04d}" for i in range(50)],
        )
    )
    st = state.snapshot()["runs"]["big"]["stragglers"]
    assert (st["open"], st["round"], st["devices"]) == (False, 3, ["dev0045", "dev0047"])
