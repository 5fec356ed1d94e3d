"""The ``[network]`` section: parsing, refusals naming the key or file:line, the timeline.

Pure: no broker, no sockets (``emo_mqtt/netscenario.py`` and its use by ``emo_mqtt/config.py``).
"""

from __future__ import annotations

import collections
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from emo_mqtt.config import RunConfig, from_dict, load_config
from emo_mqtt.errors import ConfigError
from emo_mqtt.netscenario import (
    LINK_KEYS,
    TRACE_COLUMNS,
    LinkConditions,
    NetworkConfig,
    NodeEvent,
    parse_network,
)

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["dev00", "dev01", "dev02", "dev03"]
OVERLAYS = ["ovl0", "ovl1"]
FLEET = {"device": DEVICES, "overlay": OVERLAYS, "server": ["server"]}


def _config(network: dict[str, Any], source: str = "") -> RunConfig:
    return from_dict({"fleet": {"devices": 4, "overlays": 2}, "network": network}, source)


def _net(network: dict[str, Any], base_dir: Path | None = None) -> NetworkConfig:
    return parse_network(network, base_dir or Path.cwd(), DEVICES, OVERLAYS)


def _timeline(
    net: NetworkConfig,
    seed: int = 1,
    horizon_s: float = 100.0,
    fleet: dict[str, list[str]] | None = None,
) -> list[NodeEvent]:
    return net.timeline(fleet or FLEET, seed=seed, horizon_s=horizon_s)


def _simple(events: list[NodeEvent]) -> list[tuple[float, str, str]]:
    return [(round(e.at_s, 6), e.node, e.action) for e in events]


def _availability_file(tmp_path: Path, trace: Any, name: str = "trace.json") -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(trace))
    else:
        path.write_bytes(pickle.dumps(trace))
    return path


# -- parsing ---------------------------------------------------------------------------------
def test_no_network_section_is_disabled() -> None:
    c = from_dict({})
    assert not c.network.enabled
    assert c.network == NetworkConfig()
    assert _net({}) == NetworkConfig()
    assert c.compute_speed("dev00") == 1.0


def test_link_classes_and_node_tables() -> None:
    c = _config(
        {
            "seed": 5,
            "rto_s": 0.3,
            "device": {
                "up_mbps": 2,
                "down_mbps": 10,
                "latency_ms": 40,
                "jitter_ms": 15,
                "loss": 0.01,
            },
            "overlay": {"up_mbps": 50},
            "server": {"latency_ms": 1},
            "nodes": {
                "dev01": {"up_mbps": 0.5, "loss": 0.05, "compute_speed": 0.25},
                "ovl1": {"latency_ms": 80},
            },
        }
    )
    net = c.network
    assert net.enabled and net.seed == 5 and net.rto_s == 0.3
    dev00 = net.base_conditions("dev00", "device")
    assert dev00 == LinkConditions(2.0, 10.0, 40.0, 15.0, 0.01)
    # A node's own table goes on top of its class's, key by key.
    assert net.base_conditions("dev01", "device") == LinkConditions(0.5, 10.0, 40.0, 15.0, 0.05)
    assert net.base_conditions("ovl1", "overlay") == LinkConditions(50.0, None, 80.0, 0.0, 0.0)
    assert net.base_conditions("server", "server") == LinkConditions(latency_ms=1.0)
    assert c.compute_speed("dev01") == 0.25
    assert c.compute_speed("dev02") == 1.0
    # Field units to the proxy's: Mbit/s to bytes/s, ms to s.
    up = dev00.uplink(net.rto_s)
    assert up.bandwidth_bps == 250_000.0 and up.latency_s == 0.04 and up.jitter_s == 0.015
    assert up.loss == 0.01 and up.rto_s == 0.3
    assert dev00.downlink(net.rto_s).bandwidth_bps == 1_250_000.0
    assert LinkConditions().downlink(0.2).bandwidth_bps is None
    assert not LinkConditions().shaped and dev00.shaped


def test_fleet_device_compute_speed_is_the_default_per_device() -> None:
    c = from_dict(
        {
            "fleet": {"devices": 3, "overlays": 1, "device_compute_speed": 0.5},
            "network": {"nodes": {"dev02": {"compute_speed": 2.0}}},
        }
    )
    assert c.compute_speed("dev00") == 0.5
    # Accepted, but a device cannot run faster than this machine (nodes/device.py waits only
    # when the speed is below 1).
    assert c.compute_speed("dev02") == 2.0
    with pytest.raises(ConfigError, match=r"fleet\.device_compute_speed: must be > 0"):
        from_dict({"fleet": {"device_compute_speed": 0}})


def test_events_parse_with_defaults() -> None:
    net = _net(
        {
            "events": [
                {"at_s": 1, "target": "dev00", "action": "down", "for_s": 2},
                {"at_s": 3.5, "target": "device", "action": "link", "up_mbps": 1, "latency_ms": 50},
                {"at_s": 4, "target": "broker", "action": "down"},
                {"at_s": 5, "target": "ovl0", "action": "crash", "for_s": 10},
                {"at_s": 6, "target": "all", "action": "up"},
            ]
        }
    )
    first, link, broker, crash, _ = net.events
    assert (first.at_s, first.target, first.action, first.for_s) == (1.0, "dev00", "down", 2.0)
    assert first.source == "network.events[0]"
    assert link.link == (("latency_ms", 50.0), ("up_mbps", 1.0)) and link.for_s is None
    assert broker.target == "broker" and crash.action == "crash"


def test_csv_trace(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(
        "# a comment line\n"
        "target,time_s,action,up_mbps,for_s\n"
        "\n"
        "dev00,1.5,link,0.5,\n"
        "  # an indented comment\n"
        "dev01 , 2 , down ,, 3\n"
    )
    net = _net({"trace": "t.csv"}, tmp_path)
    a, b = net.events
    assert (a.at_s, a.target, a.action, a.link, a.for_s) == (
        1.5,
        "dev00",
        "link",
        (("up_mbps", 0.5),),
        None,
    )
    assert (b.at_s, b.target, b.action, b.for_s) == (2.0, "dev01", "down", 3.0)
    assert a.source.startswith("t.csv:")
    # Events written in the file and in [[network.events]] all end up on the timeline.
    both = _net(
        {"trace": "t.csv", "events": [{"at_s": 0, "target": "dev02", "action": "down"}]}, tmp_path
    )
    assert len(both.events) == 3


def test_every_trace_column_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(",".join(TRACE_COLUMNS) + "\n" + "1,dev00,link,2,1,2,3,4,0.5\n")
    (ev,) = _net({"trace": "t.csv"}, tmp_path).events
    assert dict(ev.link) == {
        "up_mbps": 1.0,
        "down_mbps": 2.0,
        "latency_ms": 3.0,
        "jitter_ms": 4.0,
        "loss": 0.5,
    }
    assert ev.for_s == 2.0
    assert set(TRACE_COLUMNS) == {"time_s", "target", "action", "for_s", *LINK_KEYS}


def test_duty_cycle_parses() -> None:
    net = _net(
        {
            "duty_cycle": [
                {"target": "device", "period_s": 30, "on_s": 20},
                {"target": "ovl0", "period_s": 10, "on_s": 5, "phase": "aligned"},
            ]
        }
    )
    a, b = net.duty_cycles
    assert (a.target, a.period_s, a.on_s, a.phase) == ("device", 30.0, 20.0, "random")
    assert b.phase == "aligned" and b.source == "network.duty_cycle[1]"


TRACE = {
    "1": {
        "active": [0, 100],
        "inactive": [50, 150],
        "finish_time": 200,
        "duration": 100,
        "model": "Pixel 3",
    },
    "2": {"active": [20], "inactive": [180], "finish_time": 200},
    "3": {"active": [0], "inactive": [200], "finish_time": 200},
    "4": {"active": [], "inactive": [], "finish_time": 200},
}


@pytest.mark.parametrize("name", ["trace.json", "trace.pkl"])
def test_availability_json_and_plain_pickle(tmp_path: Path, name: str) -> None:
    pickled = {int(k): v for k, v in TRACE.items()}  # FedScale's pickles use int ids
    _availability_file(tmp_path, TRACE if name.endswith(".json") else pickled, name)
    net = _net({"availability": {"file": name, "time_scale": 0.5, "offset_s": 10}}, tmp_path)
    av = net.availability
    assert av is not None
    assert av.time_scale == 0.5 and av.offset_s == 10.0 and av.source == name
    assert av.clients == (
        ("1", ((0.0, 50.0), (100.0, 150.0)), 200.0),
        ("2", ((20.0, 180.0),), 200.0),
        ("3", ((0.0, 200.0),), 200.0),
        ("4", (), 200.0),
    )


def test_shipped_sample_trace_is_in_fedscale_format() -> None:
    trace = json.loads((ROOT / "scenarios/traces/fedscale_availability_sample.json").read_text())
    assert len(trace) == 20
    for entry in trace.values():
        assert set(entry) == {"active", "inactive", "finish_time", "duration", "model"}
        assert entry["duration"] == sum(
            b - a for a, b in zip(entry["active"], entry["inactive"], strict=True)
        )


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("network", "message"),
    [
        ([], "[network] must be a table"),
        ({"bandwidth": 3}, "[network]: unknown key(s) ['bandwidth']"),
        ({"seed": 1.5}, "network.seed: expected an integer"),
        ({"seed": True}, "network.seed: expected an integer"),
        ({"rto_s": 0}, "network.rto_s: 0 must be > 0"),
        ({"device": 3}, "[network.device] must be a table"),
        ({"device": {"bandwidth_mbps": 3}}, "network.device: unknown key(s) ['bandwidth_mbps']"),
        ({"device": {"up_mbps": "fast"}}, "network.device.up_mbps: expected a number"),
        ({"device": {"up_mbps": True}}, "network.device.up_mbps: expected a number"),
        ({"device": {"up_mbps": 0}}, "network.device.up_mbps: 0 must be > 0"),
        ({"overlay": {"down_mbps": -1}}, "network.overlay.down_mbps"),
        ({"device": {"loss": 1.5}}, "network.device.loss: 1.5 must be in [0.0, 1.0]"),
        ({"device": {"loss": -0.1}}, "network.device.loss"),
        ({"server": {"latency_ms": -5}}, "network.server.latency_ms: -5 must be >= 0"),
        ({"device": {"jitter_ms": float("inf")}}, "network.device.jitter_ms: expected a number"),
        ({"device": {"compute_speed": 0.5}}, "network.device: unknown key(s) ['compute_speed']"),
        ({"nodes": []}, "[network.nodes] must be a table"),
        ({"nodes": {"dev99": {"loss": 0.1}}}, "network.nodes.dev99: 'dev99' is not a node"),
        ({"nodes": {"dev00": 3}}, "[network.nodes.dev00] must be a table"),
        ({"nodes": {"dev00": {"speed": 1}}}, "network.nodes.dev00: unknown key(s) ['speed']"),
        (
            {"nodes": {"ovl0": {"compute_speed": 0.5}}},
            "network.nodes.ovl0.compute_speed: only devices",
        ),
        (
            {"nodes": {"server": {"compute_speed": 0.5}}},
            "network.nodes.server.compute_speed: only devices",
        ),
        ({"nodes": {"dev00": {"compute_speed": 0}}}, "network.nodes.dev00.compute_speed"),
        ({"nodes": {"dev00": {"compute_speed": -1}}}, "network.nodes.dev00.compute_speed"),
        ({"events": {"at_s": 1}}, "network.events must be an array of tables"),
        ({"events": [{"at_s": 1, "target": "dev00"}]}, "network.events[0]: missing key 'action'"),
        ({"events": [{"target": "dev00", "action": "down"}]}, "missing key 'at_s'"),
        (
            {"events": [{"at_s": 1, "target": "dev00", "action": "down", "when": 2}]},
            "network.events[0]: unknown key(s) ['when']",
        ),
        (
            {"events": [{"at_s": -1, "target": "dev00", "action": "down"}]},
            "network.events[0].at_s: -1 must be >= 0",
        ),
        (
            {"events": [{"at_s": "soon", "target": "dev00", "action": "down"}]},
            "network.events[0].at_s: expected a number",
        ),
        (
            {"events": [{"at_s": 1, "target": "dev00", "action": "explode"}]},
            "network.events[0].action: 'explode' is not one of",
        ),
        ({"events": [{"at_s": 1, "target": 3, "action": "down"}]}, "network.events[0].target"),
        (
            {"events": [{"at_s": 1, "target": "dev42", "action": "down"}]},
            "network.events[0]: target 'dev42' is not a node of this fleet",
        ),
        (
            {"events": [{"at_s": 1, "target": "dev00", "action": "down", "for_s": 0}]},
            "network.events[0].for_s: 0 must be > 0",
        ),
        (
            {"events": [{"at_s": 1, "target": "server", "action": "crash"}]},
            "network.events[0]: the server cannot crash",
        ),
        (
            {"events": [{"at_s": 1, "target": "all", "action": "restart"}]},
            "network.events[0]: the server cannot crash",
        ),
        (
            {"events": [{"at_s": 1, "target": "dev00", "action": "link"}]},
            "network.events[0]: action 'link' needs at least one of",
        ),
        (
            {"events": [{"at_s": 1, "target": "dev00", "action": "down", "loss": 0.1}]},
            "network.events[0]: link keys ['loss'] only go with action 'link'",
        ),
        (
            {"events": [{"at_s": 1, "target": "dev00", "action": "link", "loss": 2}]},
            "network.events[0].loss",
        ),
        (
            {"events": [{"at_s": 1, "target": "broker", "action": "crash"}]},
            "network.events[0]: the broker target takes only 'down' or 'up'",
        ),
        (
            {"events": [{"at_s": 1, "target": "broker", "action": "link", "loss": 0.1}]},
            "the broker target takes only",
        ),
        ({"trace": 3}, "network.trace: expected a CSV file's path"),
        ({"trace": "missing.csv"}, "network.trace: cannot read trace"),
        ({"duty_cycle": {"target": "device"}}, "network.duty_cycle must be an array of tables"),
        (
            {"duty_cycle": [{"target": "device", "period_s": 10}]},
            "network.duty_cycle[0]: missing key 'on_s'",
        ),
        (
            {"duty_cycle": [{"target": "device", "period_s": 10, "on_s": 5, "every": 1}]},
            "network.duty_cycle[0]: unknown key(s) ['every']",
        ),
        (
            {"duty_cycle": [{"target": "device", "period_s": 10, "on_s": 10}]},
            "network.duty_cycle[0].on_s: must be shorter than period_s",
        ),
        (
            {"duty_cycle": [{"target": "device", "period_s": 0, "on_s": 1}]},
            "network.duty_cycle[0].period_s",
        ),
        (
            {"duty_cycle": [{"target": "device", "period_s": 10, "on_s": 0}]},
            "network.duty_cycle[0].on_s",
        ),
        (
            {"duty_cycle": [{"target": "device", "period_s": 10, "on_s": 5, "phase": "late"}]},
            "network.duty_cycle[0].phase: 'late' is not one of",
        ),
        (
            {"duty_cycle": [{"target": 1, "period_s": 10, "on_s": 5}]},
            "network.duty_cycle[0].target",
        ),
        (
            {"duty_cycle": [{"target": "dev77", "period_s": 10, "on_s": 5}]},
            "network.duty_cycle[0]: target 'dev77' is not a node",
        ),
        ({"availability": "trace.json"}, "[network.availability] must be a table"),
        ({"availability": {}}, "network.availability.file: the trace file's path is required"),
        (
            {"availability": {"file": "x.json", "scale": 1}},
            "network.availability: unknown key(s) ['scale']",
        ),
        (
            {"availability": {"file": "x.json", "format": "flower"}},
            "network.availability.format: only 'fedscale'",
        ),
        (
            {"availability": {"file": "x.json", "time_scale": 0}},
            "network.availability.time_scale: 0 must be > 0",
        ),
        ({"availability": {"file": "x.json", "offset_s": -1}}, "network.availability.offset_s"),
        ({"availability": {"file": "missing.json"}}, "network.availability: cannot read"),
    ],
)
def test_bad_network_values_are_named(network: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(network)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty trace (a header row is needed"),
        ("# only a comment\n", "empty trace"),
        ("time_s,target,action,speed\n", "unknown column(s) ['speed']"),
        ("time_s,target,action,target\n", "duplicate columns"),
        ("time_s,target,action\n1,dev00\n", "t.csv:2: 2 fields, the header has 3"),
        ("time_s,target,action\n1,dev00,down,4\n", "t.csv:2: 4 fields"),
        ("time_s,target,action\nsoon,dev00,down\n", "t.csv:2: time_s 'soon' is not a number"),
        ("time_s,target,action,loss\n1,dev00,link,lots\n", "t.csv:2: loss 'lots' is not a number"),
        ("time_s,target,action,loss\n1,dev00,link,1.5\n", "t.csv:2.loss: 1.5 must be in"),
        ("time_s,target,action,latency_ms\n1,dev00,link,-3\n", "t.csv:2.latency_ms"),
        ("time_s,target,action\n1,dev00,reboot\n", "t.csv:2.action: 'reboot' is not one of"),
        ("time_s,target,action\n1,,down\n", "t.csv:2: missing key 'target'"),
        ("target,action\ndev00,down\n", "t.csv:2: missing key 'at_s'"),
        ("time_s,target,action\n1,dev00,link\n", "t.csv:2: action 'link' needs"),
        ("time_s,target,action,loss\n1,dev00,down,0.1\n", "t.csv:2: link keys ['loss']"),
        ("time_s,target,action\n1,dev99,down\n", "t.csv:2: target 'dev99' is not a node"),
        ("time_s,target,action\n1,server,crash\n", "t.csv:2: the server cannot crash"),
        ("time_s,target,action\n1,dev00,down\nnan,dev00,up\n", "t.csv:3.at_s: expected a number"),
    ],
)
def test_bad_csv_traces_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ConfigError) as err:
        _net({"trace": "t.csv"}, tmp_path)
    assert message in str(err.value)


def test_csv_line_numbers_count_comment_and_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(
        "# comment\ntime_s,target,action\n\n1,dev00,down\n2,dev00,reboot\n"
    )
    with pytest.raises(ConfigError, match=r"t\.csv:5"):
        _net({"trace": "t.csv"}, tmp_path)


@pytest.mark.parametrize(
    ("trace", "message"),
    [
        ({}, "expected a non-empty map of client id -> trace"),
        ([1, 2], "expected a non-empty map"),
        ({"7": [0, 10]}, "trace.json client 7: expected a map"),
        ({"7": {"active": [0], "inactive": [10]}}, "trace.json client 7: missing 'finish_time'"),
        ({"7": {"inactive": [10], "finish_time": 20}}, "trace.json client 7: missing 'active'"),
        ({"7": {"active": [0], "finish_time": 20}}, "client 7: missing 'inactive'"),
        (
            {"7": {"active": [0, 15], "inactive": [10], "finish_time": 20}},
            "client 7: 2 'active' times but 1 'inactive' ones",
        ),
        (
            {"7": {"active": [0, 5], "inactive": [10, 15], "finish_time": 20}},
            "client 7: active/inactive times must alternate and increase",
        ),
        (
            {"7": {"active": [10], "inactive": [10], "finish_time": 20}},
            "client 7: active/inactive times must alternate and increase",
        ),
        (
            {"7": {"active": [12], "inactive": [10], "finish_time": 20}},
            "must alternate and increase",
        ),
        (
            {"7": {"active": [-1], "inactive": [10], "finish_time": 20}},
            "client 7.active: -1 must be >= 0",
        ),
        (
            {"7": {"active": [0], "inactive": [10], "finish_time": 0}},
            "client 7.finish_time: 0 must be > 0",
        ),
        (
            {"7": {"active": ["x"], "inactive": [10], "finish_time": 20}},
            "client 7.active: expected a number",
        ),
        (
            {"7": {"active": [0], "inactive": [30], "finish_time": 20}},
            "client 7: an 'inactive' time is after finish_time",
        ),
        ({"7": {"active": 3, "inactive": [10], "finish_time": 20}}, "client 7:"),
    ],
)
def test_bad_availability_traces_are_refused(tmp_path: Path, trace: Any, message: str) -> None:
    _availability_file(tmp_path, trace)
    with pytest.raises(ConfigError) as err:
        _net({"availability": {"file": "trace.json"}}, tmp_path)
    assert message in str(err.value)


def test_availability_needs_a_client_per_device(tmp_path: Path) -> None:
    _availability_file(tmp_path, {"1": TRACE["1"]})
    with pytest.raises(ConfigError, match="1 clients in the trace for 4 devices"):
        _net({"availability": {"file": "trace.json"}}, tmp_path)


def test_bad_json_and_bad_pickle_are_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        _net({"availability": {"file": "bad.json"}}, tmp_path)
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ConfigError, match="not a FedScale trace"):
        _net({"availability": {"file": "bad.pkl"}}, tmp_path)


@pytest.mark.parametrize(
    "payload",
    [
        collections.OrderedDict(),
        {"1": collections.OrderedDict(active=[0], inactive=[1], finish_time=2)},
        {"1": {"active": [0], "inactive": [1], "finish_time": 2, "when": Path("/tmp")}},
    ],
)
def test_a_pickle_that_names_a_class_is_refused(tmp_path: Path, payload: Any) -> None:
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError, match=r"refusing to load .* from a trace pickle"):
        _net({"availability": {"file": "evil.pkl"}}, tmp_path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (marker.write_text, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"1": Evil()}))
    with pytest.raises(ConfigError, match="refusing to load"):
        _net({"availability": {"file": "evil.pkl"}}, tmp_path)
    assert not marker.exists()


# -- trace paths -----------------------------------------------------------------------------
def test_trace_paths_are_relative_to_the_scenario_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "scen"
    (folder / "traces").mkdir(parents=True)
    (folder / "traces" / "t.csv").write_text("time_s,target,action,for_s\n1,dev00,down,2\n")
    shutil.copy(
        ROOT / "scenarios/traces/fedscale_availability_sample.json",
        folder / "traces" / "avail.json",
    )
    (folder / "s.toml").write_text(
        '[fleet]\ndevices = 4\noverlays = 2\n[network]\ntrace = "traces/t.csv"\n'
        '[network.availability]\nfile = "traces/avail.json"\ntime_scale = 0.01\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = load_config(folder / "s.toml")
    assert [e.target for e in c.network.events] == ["dev00"]
    assert c.network.availability is not None
    assert len(c.network.availability.clients) == 20
    monkeypatch.chdir(tmp_path)  # a relative scenario path works too
    assert load_config("scen/s.toml").network.events == c.network.events


# -- the timeline ----------------------------------------------------------------------------
def test_events_resolve_targets_and_for_s_undoes_them() -> None:
    net = _net(
        {
            "device": {"up_mbps": 2, "latency_ms": 40},
            "nodes": {"dev01": {"latency_ms": 100}},
            "events": [
                {"at_s": 1, "target": "dev00", "action": "down", "for_s": 2},
                {"at_s": 2, "target": "ovl1", "action": "crash", "for_s": 5},
                {"at_s": 4, "target": "device", "action": "link", "up_mbps": 0.5, "for_s": 3},
                {"at_s": 20, "target": "ovl0", "action": "up", "for_s": 1},
                {"at_s": 30, "target": "ovl0", "action": "restart", "for_s": 1},
            ],
        }
    )
    tl = _timeline(net)
    assert _simple(tl)[:3] == [(1.0, "dev00", "down"), (2.0, "ovl1", "crash"), (3.0, "dev00", "up")]
    links = [e for e in tl if e.action == "link"]
    assert [(e.at_s, e.node) for e in links] == [(4.0, d) for d in DEVICES] + [
        (7.0, d) for d in DEVICES
    ]
    # A link event sets its keys on top of the node's base conditions (class, then own table);
    # its undo brings the base conditions back.
    by = {(e.at_s, e.node): e.conditions for e in links}
    assert by[4.0, "dev00"] == LinkConditions(up_mbps=0.5, latency_ms=40.0)
    assert by[4.0, "dev01"] == LinkConditions(up_mbps=0.5, latency_ms=100.0)
    assert by[7.0, "dev01"] == LinkConditions(up_mbps=2.0, latency_ms=100.0)
    assert by[7.0, "dev00"] == net.base_conditions("dev00", "device")
    assert (7.0, "ovl1", "restart") in _simple(tl)
    assert (21.0, "ovl0", "down") in _simple(tl)  # up for 1 s -> down again
    assert (31.0, "ovl0", "crash") in _simple(tl)  # restart for 1 s -> crash again
    undo = next(e for e in tl if e.at_s == 3.0)
    assert undo.source == "network.events[0] (after for_s)"
    assert [e.at_s for e in tl] == sorted(e.at_s for e in tl)
    assert tl[0].to_dict() == {
        "at_s": 1.0,
        "node": "dev00",
        "action": "down",
        "source": "network.events[0]",
    }
    assert by[4.0, "dev00"] is not None
    assert links[0].to_dict()["conditions"] == {
        "up_mbps": 0.5,
        "down_mbps": None,
        "latency_ms": 40.0,
        "jitter_ms": 0.0,
        "loss": 0.0,
    }


def test_broker_and_all_targets_expand_to_every_node() -> None:
    net = _net(
        {
            "events": [
                {"at_s": 5, "target": "broker", "action": "down", "for_s": 10},
                {"at_s": 30, "target": "all", "action": "link", "latency_ms": 9},
            ]
        }
    )
    tl = _timeline(net)
    every = DEVICES + OVERLAYS + ["server"]
    assert sorted(e.node for e in tl if e.at_s == 5) == sorted(every)
    assert {e.action for e in tl if e.at_s == 5} == {"down"}
    assert sorted(e.node for e in tl if e.at_s == 15) == sorted(every)
    assert {e.action for e in tl if e.at_s == 15} == {"up"}
    assert sorted(e.node for e in tl if e.at_s == 30) == sorted(every)
    # A fleet without overlays (fl, sfl): the classes expand to what is there.
    fl_fleet = {"device": DEVICES, "overlay": [], "server": ["server"]}
    assert len(_timeline(net, fleet=fl_fleet)) == 2 * (len(DEVICES) + 1) + len(DEVICES) + 1


def test_an_event_on_an_overlay_is_skipped_in_a_fleet_without_overlays() -> None:
    net = _net({"events": [{"at_s": 1, "target": "ovl1", "action": "crash", "for_s": 5}]})
    fl_fleet = {"device": DEVICES, "overlay": [], "server": ["server"]}
    assert _timeline(net, fleet=fl_fleet) == []


def test_events_past_the_horizon_are_dropped() -> None:
    net = _net({"events": [{"at_s": 5, "target": "dev00", "action": "down", "for_s": 10}]})
    assert _simple(_timeline(net, horizon_s=10)) == [(5.0, "dev00", "down")]
    assert _simple(_timeline(net, horizon_s=15)) == [(5.0, "dev00", "down"), (15.0, "dev00", "up")]


def _down_at(events: list[NodeEvent], node: str, t: float) -> bool:
    """Whether ``node`` is down at time ``t``, replaying its events in order."""
    down = False
    for e in events:
        if e.node == node and e.at_s <= t:
            down = e.action == "down"
    return down


def test_duty_cycle_is_down_exactly_off_its_window() -> None:
    period, on = 10.0, 6.0
    net = _net({"duty_cycle": [{"target": "device", "period_s": period, "on_s": on}]})
    tl = _timeline(net, seed=3, horizon_s=60)
    for node in DEVICES:
        mine = [e for e in tl if e.node == node]
        assert mine and {e.action for e in mine} <= {"down", "up"}
        # The offset: the first 'up', minus whole periods.
        ups = [e.at_s for e in mine if e.action == "up"]
        offset = ups[0] % period
        for i in range(600):
            t = i / 10 + 0.05  # avoid the exact switching instants
            expected = ((t - offset) % period) >= on
            assert _down_at(tl, node, t) == expected, (node, t, offset)
    offsets = {
        next(e.at_s for e in tl if e.node == n and e.action == "up") % period for n in DEVICES
    }
    assert len(offsets) == len(DEVICES)  # each device its own random phase
    assert all(e.node in DEVICES for e in tl)


def test_aligned_duty_cycle_starts_on_at_zero() -> None:
    net = _net({"duty_cycle": [{"target": "ovl0", "period_s": 10, "on_s": 4, "phase": "aligned"}]})
    assert _simple(_timeline(net, horizon_s=25)) == [
        (4.0, "ovl0", "down"),
        (10.0, "ovl0", "up"),
        (14.0, "ovl0", "down"),
        (20.0, "ovl0", "up"),
        (24.0, "ovl0", "down"),
    ]


def test_the_timeline_is_deterministic_and_seeded(tmp_path: Path) -> None:
    _availability_file(
        tmp_path,
        {str(i): {"active": [i], "inactive": [i + 50], "finish_time": 100} for i in range(10)},
    )
    raw = {
        "duty_cycle": [{"target": "device", "period_s": 30, "on_s": 20}],
        "availability": {"file": "trace.json", "time_scale": 0.5},
        "events": [{"at_s": 1, "target": "dev00", "action": "down", "for_s": 1}],
    }
    a = _net(raw, tmp_path)
    b = _net(raw, tmp_path)
    assert _timeline(a, seed=1) == _timeline(a, seed=1) == _timeline(b, seed=1)
    assert _timeline(a, seed=1) != _timeline(a, seed=2)
    duty = {
        s: [e.at_s for e in _timeline(_net({"duty_cycle": raw["duty_cycle"]}), seed=s)]
        for s in (1, 2)
    }
    assert duty[1] != duty[2]


def test_availability_time_scale_offset_and_wrap_around(tmp_path: Path) -> None:
    # One client per device, so that every one is picked; client k is active [k, k + 4) of
    # a 10 s trace, which wraps around.
    trace = {f"c{k}": {"active": [k], "inactive": [k + 4], "finish_time": 10} for k in range(4)}
    _availability_file(tmp_path, trace)
    net = _net({"availability": {"file": "trace.json", "time_scale": 2.0}}, tmp_path)
    tl = _timeline(net, horizon_s=50)
    assert net.availability is not None
    starts: dict[str, float] = {}
    for node in DEVICES:
        mine = [e for e in tl if e.node == node]
        # Run seconds = trace seconds x time_scale: on for 8 s of every 20 s.
        ups = [e.at_s for e in mine if e.action == "up"]
        downs = [e.at_s for e in mine if e.action == "down"]
        first_up = ups[0]
        starts[node] = first_up % 20.0
        assert [u - first_up for u in ups] == [20.0 * i for i in range(len(ups))][: len(ups)]
        for u in ups:
            assert u + 8.0 in downs or u + 8.0 > 50
    # The client behind each device: picked at random (seeded), all four distinct.
    assert sorted(starts.values()) == [0.0, 2.0, 4.0, 6.0]
    # c0 is active at t = 0: no 'down' at 0 for its device; the others start down.
    at_zero = [e for e in tl if e.at_s == 0.0]
    assert len(at_zero) == 3 and {e.action for e in at_zero} == {"down"}

    # offset_s (trace seconds) shifts the start; past finish_time the trace wraps around.
    shifted = _net(
        {"availability": {"file": "trace.json", "time_scale": 1.0, "offset_s": 12}}, tmp_path
    )
    tl = _timeline(shifted, horizon_s=30)
    # Check every device against one of the clients, at many instants.
    for node in DEVICES:
        matches = []
        for k in range(4):
            ok = all(
                _down_at(tl, node, t) == (not (k <= (12 + t) % 10 < k + 4))
                for t in [x / 4 + 0.1 for x in range(120)]
            )
            matches.append(ok)
        assert matches.count(True) == 1, node


def test_availability_interval_across_the_wrap_stays_up(tmp_path: Path) -> None:
    trace = {f"c{k}": {"active": [0, 8], "inactive": [2, 10], "finish_time": 10} for k in range(4)}
    _availability_file(tmp_path, trace)
    net = _net({"availability": {"file": "trace.json"}}, tmp_path)
    tl = _timeline(net, horizon_s=25)
    for t in (0.5, 1.9, 8.5, 9.9, 10.5, 11.9, 18.1, 20.5):
        assert not _down_at(tl, "dev00", t), t
    for t in (2.1, 7.9, 12.1, 17.9, 22.5):
        assert _down_at(tl, "dev00", t), t


# -- the section in a RunConfig --------------------------------------------------------------
def test_overrides_and_to_dict_keep_the_network_section() -> None:
    network = {
        "seed": 3,
        "device": {"up_mbps": 2.0},
        "events": [{"at_s": 1, "target": "dev00", "action": "down", "for_s": 2}],
    }
    c = _config(network)
    d = c.to_dict()
    assert d["network"] == network
    assert d["fleet"]["device_compute_speed"] == 1.0
    json.dumps(d)  # JSON-ready
    o = c.with_overrides(run={"rounds": 2})
    assert o.run.rounds == 2 and o.network == c.network
    # Overriding the network section itself is validated too.
    assert c.with_overrides(network={"rto_s": 0.5}).network.rto_s == 0.5
    with pytest.raises(ConfigError, match=r"network\.rto_s"):
        c.with_overrides(network={"rto_s": -1})
    # A copy, not the same dicts: changing the output does not change the config.
    d["network"]["device"]["up_mbps"] = 99.0
    assert c.network.raw["device"]["up_mbps"] == 2.0


def test_shipped_network_scenarios_load_and_plan() -> None:
    names = ["cellular", "duty_cycle", "wan_outage", "fedscale"]
    for name in names:
        c = load_config(ROOT / "scenarios" / f"{name}.toml")
        assert c.network.enabled, name
        assert {"fl", "emo"} <= set(c.run.algorithms), name
        fleet = {"device": c.device_ids(), "overlay": c.overlay_ids(), "server": ["server"]}
        tl = c.network.timeline(fleet, seed=c.run.seed, horizon_s=120)
        assert tl, name
    # tests/test_config.py::test_shipped_scenarios_load globs scenarios/*.toml: it covers them.
    assert {f"{n}.toml" for n in names} <= {p.name for p in (ROOT / "scenarios").glob("*.toml")}


def test_availability_has_no_down_and_up_at_the_same_instant(tmp_path: Path) -> None:
    trace = {f"c{k}": {"active": [0, 8], "inactive": [2, 10], "finish_time": 10} for k in range(4)}
    _availability_file(tmp_path, trace)
    tl = _timeline(_net({"availability": {"file": "trace.json"}}, tmp_path), horizon_s=25)
    mine = [(e.at_s, e.action) for e in tl if e.node == "dev00"]
    assert (10.0, "down") not in mine and (20.0, "down") not in mine, mine
