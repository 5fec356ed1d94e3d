"""The ``emo`` command line: subcommands, output formats and errors a user sees.

Most tests call :func:`emo_mqtt.cli.main` in-process (fast, output through capsys); a few
run the installed console script to check what a shell sees: the exit status included.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from emo_mqtt import __version__
from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.cli import _size, main
from emo_mqtt.topics import SPECS, markdown_table

EMO = str(Path(sys.executable).with_name("emo"))


def _emo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EMO, *args], capture_output=True, text=True, timeout=120, check=False)


# ----------------------------------------------------------------- help and topics


def test_help_lists_the_subcommands() -> None:
    result = _emo("--help")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^ {4}(\w+) ", result.stdout, flags=re.MULTILINE)
    assert {"broker", "demo", "topics", "bench"} <= set(listed), listed
    bench = _emo("bench", "--help")
    assert bench.returncode == 0
    assert {"bus", "codec"} <= set(re.findall(r"^ {4}(\w+) ", bench.stdout, flags=re.MULTILINE))
    version = _emo("--version")
    assert version.stdout.strip() == f"emo-mqtt {__version__}"


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_topics_markdown_is_the_docs_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == markdown_table()
    lines = out.splitlines()
    assert lines[0].startswith("| topic (below `emo/<run>/`) | tier | publisher |")
    assert set(lines[1]) == {"|", "-"}
    assert len(lines) == 2 + len(SPECS)
    for spec, line in zip(SPECS, lines[2:], strict=True):
        assert line.startswith(f"| `{spec.pattern}` |")


def test_topics_plain_lists_every_topic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SPECS)
    for spec, line in zip(SPECS, lines, strict=True):
        assert line.startswith(f"emo/<run>/{spec.pattern}")
        assert f"qos={spec.qos}" in line


# ----------------------------------------------------------------- bench


@pytest.mark.broker
def test_bench_bus_json(mosquitto: BrokerHandle, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "bus", "--broker", mosquitto.url, "--size", "100k", "--count", "3"]
    assert main([*argv, "--repeats", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # --json: no progress lines, and a given broker is not announced
    (line,) = out.splitlines()
    result = json.loads(line)
    # Correctness only: no speed assertion, benchmarks never gate tests.
    assert isinstance(result["mb_per_s"], float) and result["mb_per_s"] > 0
    assert (result["messages"], result["bytes"], result["size"]) == (3, 300_000, 100_000)
    assert result["repeats"] == 1 and len(result["runs_mb_per_s"]) == 1
    assert result["wire_bytes"] > 300_000
    assert result["baseline_bare_aiomqtt_mb_per_s"] > 0
    assert result["client"] == "fast" and len(result["paired_ratios"]) == 1
    assert result["msgs_per_s"] > 0 and len(result["baseline_runs_msgs_per_s"]) == 1
    assert result["baseline_frame_bytes"] == 100_000  # the session broker takes it whole


@pytest.mark.broker
def test_bench_bus_plain_on_a_capped_broker(
    mosquitto: BrokerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    # The session broker caps packets at 2 MiB + 64 KiB: the bare reference goes in frames.
    argv = ["bench", "bus", "--broker", mosquitto.url, "--size", "3MB", "--count", "1"]
    assert main([*argv, "--repeats", "1", "--plain", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["client"] == "plain"
    assert result["baseline_frame_bytes"] == 1_048_576
    assert "3 consecutive frames of at most 1048576 bytes" in result["baseline_note"]


@pytest.mark.broker
def test_bench_bus_without_broker_starts_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "bus", "--size", "2M", "--count", "1", "--repeats", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    # Its broker takes the bare reference's unchunked 2 MB payloads (above the default cap).
    assert re.fullmatch(
        r"broker: Mosquitto \S+ on 127\.0\.0\.1:\d+ \(started by emo, pid \d+\)\n", err
    )
    result = json.loads(out)
    assert (result["messages"], result["bytes"]) == (1, 2_000_000)
    assert result["baseline_bare_aiomqtt_mb_per_s"] > 0


@pytest.mark.broker
def test_bench_bus_size_not_a_multiple_of_4_is_a_clear_error(
    mosquitto: BrokerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "bus", "--broker", mosquitto.url, "--size", "1001", "--count", "1"]
    assert main([*argv, "--repeats", "1", "--json"]) == 2
    assert "emo: error: size must be a multiple of 4 bytes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1_048_576),
        ("100k", 100_000),
        ("100K", 100_000),
        ("1M", 1_000_000),
        ("10MB", 10_000_000),
        ("10mb", 10_000_000),
        ("1.5k", 1_500),
        ("2G", 2_000_000_000),
        ("1Ki", 1024),
        ("1MiB", 2**20),
        (" 3m ", 3_000_000),
    ],
)
def test_size_parsing(text: str, expected: int) -> None:
    assert _size(text) == expected


@pytest.mark.parametrize(
    "text", ["bad", "", "MB", "1x", "1kk", "0", "-5", "0.0001", "inf", "1e999", "nan"]
)
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"not a size|must be positive"):
        _size(text)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--size", "bad", "argument --size: not a size: 'bad' (try 100000, 100k, 1M, 10MB)"),
        ("--size", "inf", "argument --size: not a size: 'inf'"),
        ("--size", "0", "argument --size: size must be positive: '0'"),
        ("--count", "0", "argument --count: must be at least 1: '0'"),
        ("--count", "three", "argument --count: not an integer: 'three'"),
        ("--repeats", "-1", "argument --repeats: must be at least 1: '-1'"),
        ("--chunk-size", "2M", "argument --chunk-size: chunk size must be between 64 bytes"),
    ],
)
def test_bad_bench_options_exit_2(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused while parsing: no broker is started or contacted.
    with pytest.raises(SystemExit) as info:
        main(["bench", "bus", option, value])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------- demo


@pytest.mark.broker
def test_demo_on_a_given_broker(
    mosquitto: BrokerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--broker", mosquitto.url, "--json"]) == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()
    summary = json.loads(line)
    assert summary["broker"] == mosquitto.url
    assert summary["nodes"] == 6  # server, overlay and 4 devices
    assert summary["messages"] == 9  # 4 updates, 4 activation batches, 1 global model
    assert summary["frames"] > summary["messages"]  # the activation batches were chunked
    assert summary["bytes"] > 4 * 2**20
    assert summary["rejected"] == 0
    assert "broker:" not in err  # it used ours: nothing to announce
    assert "overlay: received 4 activation batches, bit-identical" in err
    assert "devices: all 4 received the averaged model, bit-identical" in err


@pytest.mark.broker
def test_demo_without_broker_starts_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--devices", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    first = err.splitlines()[0]
    found = re.fullmatch(
        r"broker: Mosquitto [\d.]+ on 127\.0\.0\.1:(\d+) \(started by emo, pid \d+\)", first
    )
    assert found, first
    assert int(found[1]) != 1883  # never the system broker's port
    assert summary["broker"] == f"mqtt://127.0.0.1:{found[1]}"
    assert (summary["nodes"], summary["messages"], summary["rejected"]) == (3, 3, 0)
    assert summary["bytes"] > 0


def test_bad_broker_url_exits_2_with_a_clear_error() -> None:
    result = _emo("demo", "--broker", "ftp://x")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "emo: error: invalid broker URL 'ftp://x': unsupported scheme 'ftp', "
        "use mqtt (tcp) or mqtts (ssl) (expected mqtt://[user[:password]@]host[:port] or mqtts://...)"
    )


def test_bad_broker_url_for_bench_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "bus", "--broker", "mqtt://host:99999", "--json"]) == 2
    assert "port 99999 out of range" in capsys.readouterr().err


# ----------------------------------------------------------------- small things users hit


def test_an_unreachable_broker_is_one_line_before_any_data_is_loaded(
    capsys: pytest.CaptureFixture[str],
    tiny_scenario: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import emo_mqtt.fleet

    def no_data(*args: object) -> None:
        raise AssertionError("the data was loaded before the broker was found unreachable")

    monkeypatch.setattr(emo_mqtt.fleet, "plan_data", no_data)
    with socket.socket() as closed:  # a port nobody listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        code = main(["run", str(tiny_scenario("unreach")), "--broker", f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err == f"emo: error: cannot reach the broker at tcp://127.0.0.1:{port}: Connection refused"
    )


def test_algorithms_may_be_written_with_spaces(
    capsys: pytest.CaptureFixture[str], tiny_scenario: Callable[[str], Path]
) -> None:
    # An unknown name is reported by the config check, before any broker is needed: the
    # message lists what was parsed, which shows that "fl, emo" became ["fl", "emo"].
    assert (
        main(
            [
                "run",
                str(tiny_scenario("spaces")),
                "--algorithms",
                "fl, emo, nope",
                "--broker",
                "mqtt://127.0.0.1:9",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown 'nope'" in err and "' emo'" not in err


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["topics"], 0),
        (["-v", "topics"], 1),
        (["topics", "-v"], 1),
        (["topics", "-vv"], 2),
        (["bench", "bus", "-v"], 1),
        (["-v", "topics", "-vv"], 2),
    ],
)
def test_verbose_goes_before_or_after_the_subcommand(argv: list[str], level: int) -> None:
    from emo_mqtt.cli import build_parser

    assert build_parser().parse_args(argv).verbose == level


def test_infer_refuses_a_negative_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["infer", "somewhere", "--limit", "-5"])
    assert info.value.code == 2
    assert "--limit: must be 0 (no limit) or more: '-5'" in capsys.readouterr().err


def test_a_device_node_needs_its_id(
    capsys: pytest.CaptureFixture[str], tiny_scenario: Callable[[str], Path]
) -> None:
    assert (
        main(
            [
                "node",
                "device",
                "--broker",
                "mqtt://127.0.0.1:9",
                "--run",
                "t1",
                "--config",
                str(tiny_scenario("noid")),
            ]
        )
        == 2
    )
    assert "emo node device needs --id" in capsys.readouterr().err


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    """`emo scenarios | head -1`: the pipe closes under the writer (here: before it writes)."""
    proc = subprocess.Popen([EMO, "scenarios"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # nobody reads: every write of emo's gets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
