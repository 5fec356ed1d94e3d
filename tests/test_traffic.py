"""Message logs (``emo_mqtt.traffic``, ``emo traffic``): reading, summaries and replay.

The pure tests use hand-written logs; the replay tests publish through the session's
Mosquitto (never the system one) on run ids of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus import BusOptions, open_bus
from emo_mqtt.chunking import HEADER_SIZE, split
from emo_mqtt.cli import main
from emo_mqtt.errors import ConfigError, TopicError
from emo_mqtt.msglog import COLUMNS
from emo_mqtt.traffic import (
    LogRow,
    byte_kind,
    format_summary,
    payload_size,
    read_log,
    replay_log,
    replay_run,
    summarize_log,
)

HEADER = ",".join(COLUMNS)
RUN = "emo/paper-emo"

GOOD = f"""{HEADER}
0.010000,0.020000,server,{RUN}/server/round,50000,1,1
0.500000,0.900000,dev01,{RUN}/device/dev01/update,40000,1,0
0.600000,1.400000,dev01,{RUN}/device/dev01/activations,1500000,1,0
1.200000,1.250000,dev02,{RUN}/device/dev02/update,40000,1,0
1.300000,1.300100,dev02,{RUN}/telemetry/metrics/device/dev02,300,0,0
2.500000,2.600000,ovl0,{RUN}/overlay/ovl0/model,800000,1,0
2.700000,2.700500,server,{RUN}/control/dev01,120,1,1
2.800000,2.800200,dev02,somewhere/else,10,0,0
"""


def _write(tmp_path: Path, text: str, name: str = "messages.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------- reading


def test_read_log_reads_every_row(tmp_path: Path) -> None:
    rows = read_log(_write(tmp_path, GOOD))
    assert len(rows) == 8
    assert rows[0] == LogRow(0.01, 0.02, "server", f"{RUN}/server/round", 50000, 1, True)
    assert rows[4].qos == 0 and rows[4].retain is False
    assert [r.sender for r in rows].count("dev02") == 3


def test_read_log_takes_any_column_order_extra_columns_and_blank_lines(tmp_path: Path) -> None:
    text = (
        "sender,topic,bytes,qos,retain,time_s,ack_s,note\n"
        "dev01,emo/r/device/dev01/update,10,1,0,1.5,2.0,first\n"
        "\n"
        "dev01,emo/r/device/dev01/update,0,0,0,3,3,\n"
    )
    rows = read_log(_write(tmp_path, text))
    assert rows == [
        LogRow(1.5, 2.0, "dev01", "emo/r/device/dev01/update", 10, 1, False),
        LogRow(3.0, 3.0, "dev01", "emo/r/device/dev01/update", 0, 0, False),
    ]


def test_a_header_only_log_is_empty(tmp_path: Path) -> None:
    assert read_log(_write(tmp_path, HEADER + "\n")) == []


OK_ROW = "1.0,1.5,dev01,emo/r/device/dev01/update,10,1,0"


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("", 1, "empty file"),
        ("time_s,ack_s,sender,topic,bytes,qos\n" + OK_ROW[:-2], 1, "lacks column(s) retain"),
        ("time_s,ack_s,sender,topic,bytes,qos,retain,qos\n", 1, "repeats column(s) qos"),
        (f"{HEADER}\n{OK_ROW}\n1.0,1.5,dev01,emo/r/x,10,1\n", 3, "6 fields, expected 7"),
        (f"{HEADER}\n{OK_ROW}\n{OK_ROW},extra\n", 3, "8 fields, expected 7"),
        (f"{HEADER}\nsoon,1.5,dev01,emo/r/x,10,1,0\n", 2, "time_s is not a number: 'soon'"),
        (f"{HEADER}\nnan,1.5,dev01,emo/r/x,10,1,0\n", 2, "time_s must be a finite number"),
        (f"{HEADER}\n-1,1.5,dev01,emo/r/x,10,1,0\n", 2, "time_s must be a finite number >= 0"),
        (f"{HEADER}\n2.0,1.5,dev01,emo/r/x,10,1,0\n", 2, "ack_s 1.5 is before time_s 2.0"),
        (f"{HEADER}\n1.0,1.5,,emo/r/x,10,1,0\n", 2, "sender is empty"),
        (f"{HEADER}\n1.0,1.5,dev01,emo/r/#,10,1,0\n", 2, "not a topic one can publish to"),
        (f"{HEADER}\n1.0,1.5,dev01,,10,1,0\n", 2, "not a topic one can publish to"),
        (f"{HEADER}\n{OK_ROW}\n1.0,1.5,dev01,emo/r/x,-5,1,0\n", 3, "bytes must be >= 0: -5"),
        (f"{HEADER}\n1.0,1.5,dev01,emo/r/x,1.5e3,1,0\n", 2, "bytes is not an integer"),
        (f"{HEADER}\n1.0,1.5,dev01,emo/r/x,10,2,0\n", 2, "qos must be 0 or 1: '2'"),
        (f"{HEADER}\n1.0,1.5,dev01,emo/r/x,10,1,yes\n", 2, "retain is not an integer: 'yes'"),
        (f'{HEADER}\n1.0,1.5,dev01,"emo/r/x\n', 2, "not CSV"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else None,
)
def test_bad_logs_are_refused_naming_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_log(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert problem in message


def test_a_missing_log_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the message log"):
        read_log(tmp_path / "nope.csv")


# ----------------------------------------------------------------- summary


def test_byte_kinds_follow_the_topic_grammar() -> None:
    assert byte_kind(f"{RUN}/device/dev01/activations") == "activations"
    assert byte_kind(f"{RUN}/server/round") == "weights"
    assert byte_kind(f"{RUN}/telemetry/metrics/device/dev02") == "metrics"
    assert byte_kind(f"{RUN}/device/dev01/nonsense") == "other"
    assert byte_kind("somewhere/else") == "other"


def test_summary_figures_of_a_hand_written_log(tmp_path: Path) -> None:
    summary = summarize_log(read_log(_write(tmp_path, GOOD)), bucket_s=1.0)
    total = 50000 + 40000 + 1500000 + 40000 + 300 + 800000 + 120 + 10
    assert summary["messages"] == 8
    assert summary["bytes"] == total
    assert summary["retained"] == 2
    assert (summary["start_s"], summary["end_s"]) == (0.01, 2.8002)
    assert summary["duration_s"] == pytest.approx(2.7902)
    assert summary["bytes_per_s"] == pytest.approx(total / 2.7902, abs=0.1)
    assert summary["publish_s_max"] == pytest.approx(0.8)
    assert summary["by_kind"] == {
        "activations": {"messages": 1, "bytes": 1500000},
        "weights": {"messages": 4, "bytes": 50000 + 40000 + 40000 + 800000},
        "metrics": {"messages": 1, "bytes": 300},
        "control": {"messages": 1, "bytes": 120},
        "other": {"messages": 1, "bytes": 10},
    }
    assert list(summary["by_kind"]) == ["activations", "weights", "metrics", "control", "other"]
    assert summary["by_sender"] == {
        "dev01": {"messages": 2, "bytes": 1540000},
        "ovl0": {"messages": 1, "bytes": 800000},
        "server": {"messages": 2, "bytes": 50120},
        "dev02": {"messages": 3, "bytes": 40310},
    }
    assert summary["buckets"] == [
        {"start_s": 0.0, "messages": 3, "bytes": 1590000},
        {"start_s": 1.0, "messages": 2, "bytes": 40300},
        {"start_s": 2.0, "messages": 3, "bytes": 800130},
    ]
    json.dumps(summary)  # JSON-ready
    fine = summarize_log(read_log(_write(tmp_path, GOOD)), bucket_s=0.5)
    assert len(fine["buckets"]) == 6  # 0 to 2.8 s: empty buckets included
    assert fine["buckets"][3] == {"start_s": 1.5, "messages": 0, "bytes": 0}
    assert sum(b["bytes"] for b in fine["buckets"]) == total


def test_summary_of_an_empty_log_and_bad_buckets() -> None:
    empty = summarize_log([])
    assert (empty["messages"], empty["bytes"], empty["buckets"]) == (0, 0, [])
    assert "messages: 0" in format_summary(empty)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="bucket_s"):
            summarize_log([], bucket_s=bad)


def test_format_summary_is_a_table(tmp_path: Path) -> None:
    text = format_summary(summarize_log(read_log(_write(tmp_path, GOOD))))
    lines = text.splitlines()
    assert lines[0] == "messages: 8 (2 retained), bytes: 2430430 (2.4 MB)"
    assert any(line.split()[:3] == ["activations", "1", "1500000"] for line in lines)
    assert any(line.split()[:3] == ["dev02", "3", "40310"] for line in lines)
    assert any(line.startswith("     0.000         3       1590000  #") for line in lines)


# ----------------------------------------------------------------- replay helpers


def test_replay_run_rewrites_the_run_segment() -> None:
    assert replay_run(f"{RUN}/server/round", "new") == "new"
    assert replay_run(f"{RUN}/server/round", None) == "paper-emo-replay"
    assert replay_run("somewhere/else", None) is None
    assert replay_run("emo/onlyrun", None) is None
    with pytest.raises(TopicError):
        replay_run(f"{RUN}/server/round", "bad run")


def test_payload_size_puts_the_logged_bytes_on_the_wire() -> None:
    chunk_size = 200
    exact = 0
    for wire in range(0, 2000):
        n = payload_size(wire, chunk_size)
        sent = (
            n
            if n <= chunk_size
            else sum(map(len, split(bytes(n), chunk_size=chunk_size - HEADER_SIZE)))
        )
        if sent == wire:
            exact += 1
        else:  # impossible sizes round down: just above chunk_size, or a header-only frame
            slack = 2 * HEADER_SIZE if wire <= chunk_size + 2 * HEADER_SIZE else HEADER_SIZE
            assert 0 < wire - sent <= slack, wire
    assert exact == 2000 - 2 * HEADER_SIZE - 8 * HEADER_SIZE  # gaps above 200, 400, ... 1800
    assert payload_size(1_500_000, BusOptions().chunk_size) == 1_500_000 - 2 * HEADER_SIZE


# ----------------------------------------------------------------- replay through Mosquitto


def _replay_log_text() -> tuple[str, list[LogRow]]:
    """20 rows from 2 senders over 2 s; one chunked message and one too big to retain."""
    rows: list[LogRow] = []
    for i in range(10):
        t = round(0.2 * i, 6)
        rows.append(
            LogRow(t, round(t + 0.01, 6), "dev01", f"{RUN}/device/dev01/update", 1000 + i, 1, False)
        )
        topic = f"{RUN}/server/round" if i % 3 == 0 else f"{RUN}/telemetry/metrics/server/server"
        rows.append(
            LogRow(
                round(t + 0.05, 6),
                round(t + 0.06, 6),
                "server",
                topic,
                500 + i,
                1 if i % 3 == 0 else 0,
                i % 3 == 0,
            )
        )
    # rows[2 * i] is dev01's i-th message, rows[2 * i + 1] the server's.
    rows[4] = LogRow(0.4, 1.4, "dev01", f"{RUN}/device/dev01/activations", 1_500_000, 1, False)
    rows[7] = LogRow(0.65, 1.5, "server", f"{RUN}/server/done", 1_200_000, 1, True)
    lines = [HEADER] + [
        f"{r.time_s:.6f},{r.ack_s:.6f},{r.sender},{r.topic},{r.bytes},{r.qos},{int(r.retain)}"
        for r in sorted(rows, key=lambda r: r.ack_s)
    ]
    return "\n".join(lines) + "\n", rows


class _Listener:
    """A subscriber to ``emo/<run>/#`` in a task: what it got as (topic, size, retain)."""

    def __init__(self, url: str, run: str, expect: int = 0) -> None:
        self.got: list[tuple[str, int, bool]] = []
        self.expect = expect
        self.ready = asyncio.Event()
        self.full = asyncio.Event()
        self.task = asyncio.create_task(self._run(url, run))

    async def _run(self, url: str, run: str) -> None:
        async with open_bus(url, f"{run}-test-subscriber", clean_start=True) as bus:
            await bus.subscribe(f"emo/{run}/#")
            self.ready.set()
            async for message in bus.messages():
                self.got.append((message.topic, len(message.payload), message.retain))
                if len(self.got) >= self.expect:
                    self.full.set()

    async def __aenter__(self) -> _Listener:
        await asyncio.wait_for(self.ready.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.mark.broker
async def test_replay_reproduces_topics_sizes_and_timing(
    mosquitto: BrokerHandle, tmp_path: Path
) -> None:
    text, written = _replay_log_text()
    rows = read_log(_write(tmp_path, text))
    assert sorted(rows, key=lambda r: r.time_s) == sorted(written, key=lambda r: r.time_s)
    run, speed = "traffic-replay-it", 4.0
    chunk_size = BusOptions().chunk_size
    want = Counter(
        (r.topic.replace(RUN, f"emo/{run}"), payload_size(r.bytes, chunk_size)) for r in rows
    )
    retained_topics = {
        r.topic.replace(RUN, f"emo/{run}") for r in rows if r.retain and r.bytes <= chunk_size
    }
    said: list[str] = []
    # Everything arrives, plus one empty retained message per retained topic (the clean-up).
    async with _Listener(mosquitto.url, run, len(rows) + len(retained_topics)) as listener:
        began = time.monotonic()
        result = await asyncio.wait_for(
            replay_log(rows, mosquitto.url, run=run, speed=speed, say=said.append), 60
        )
        elapsed = time.monotonic() - began
        await asyncio.wait_for(listener.full.wait(), 30)
    got = listener.got
    assert Counter((topic, size) for topic, size, _ in got if size) == want
    assert Counter(topic for topic, size, _ in got if not size) == Counter(retained_topics)
    assert all(topic.startswith(f"emo/{run}/") for topic, _, _ in got)
    # One client per sender: a sender's (unchunked) messages arrive in log order.
    dev01 = [size for topic, size, _ in got if topic.endswith("/device/dev01/update")]
    assert dev01 == sorted(dev01)

    assert result["messages"] == 20
    assert result["bytes"] == sum(r.bytes for r in rows)  # chunk headers included, exactly
    assert result["by_sender"] == {"dev01": 10, "server": 10}
    assert result["unretained"] == 1  # the 1.2 MB server/done
    assert result["skipped"] == 0
    assert result["runs"] == {"paper-emo": run}
    last = max(r.time_s for r in rows) / speed
    assert result["wall_s"] >= last
    assert elapsed >= last
    assert result["lag_s_max"] < 0.5
    assert any("20/20 messages (100%)" in line for line in said)
    assert sum("messages (" in line for line in said) == 10  # progress every 10 %

    # The replay cleared the retained topics it set: a late subscriber finds none.
    async with _Listener(mosquitto.url, run) as late:
        await asyncio.sleep(0.3)
    assert late.got == []


@pytest.mark.broker
async def test_replay_without_run_goes_to_old_run_replay(mosquitto: BrokerHandle) -> None:
    rows = [
        LogRow(0.0, 0.0, "dev09", "emo/traffic-default/device/dev09/update", 10, 1, False),
        LogRow(0.0, 0.0, "dev09", "not/an/emo/topic", 10, 1, False),
    ]
    said: list[str] = []
    async with _Listener(mosquitto.url, "traffic-default-replay", 1) as listener:
        result = await replay_log(rows, mosquitto.url, run=None, say=said.append)
        await asyncio.wait_for(listener.full.wait(), 30)
    assert listener.got == [("emo/traffic-default-replay/device/dev09/update", 10, False)]
    assert (result["messages"], result["skipped"]) == (1, 1)
    assert any("skipping 1 message" in line for line in said)


async def test_replay_refuses_a_bad_speed() -> None:
    with pytest.raises(ConfigError, match="speed"):
        await replay_log([], "mqtt://127.0.0.1:1", run="x", speed=0)


# ----------------------------------------------------------------- CLI


def test_cli_traffic_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, GOOD)
    assert main(["traffic", "summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("messages: 8 (2 retained), bytes: 2430430")
    assert main(["traffic", "summary", str(path), "--bucket-s", "0.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bytes"] == 2430430
    assert len(summary["buckets"]) == 6


def test_cli_traffic_summary_of_a_bad_log_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, f"{HEADER}\n{OK_ROW}\n{OK_ROW}\n1.0,1.5,dev01,emo/r/x,-5,1,0\n")
    assert main(["traffic", "summary", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"emo: error: {path}:4: bytes must be >= 0: -5\n"


def test_cli_traffic_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["traffic", "replay", "x.csv", "--speed", "0"])
    assert info.value.code == 2
    assert "argument --speed: must be a positive number: '0'" in capsys.readouterr().err


def test_cli_traffic_replay_refuses_a_bad_run_before_any_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, f"{HEADER}\n{OK_ROW}\n")
    assert main(["traffic", "replay", str(path), "--run", "bad run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emo: error: invalid run 'bad run'")
    assert "broker:" not in err


@pytest.mark.broker
def test_cli_traffic_replay(
    mosquitto: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, f"{HEADER}\n{OK_ROW}\n2.0,2.1,dev02,emo/r/device/dev02/update,20,1,0\n")
    argv = [
        "traffic",
        "replay",
        str(path),
        "--broker",
        mosquitto.url,
        "--run",
        "traffic-cli",
        "--speed",
        "10",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("replayed 2 messages, 30 bytes in ")
    assert "replay: 2/2 messages (100%)" in err
