"""Message logs of ``emo run``: read, summarise and replay them (``emo traffic``).

``emo run`` writes, per algorithm, ``<out>/<algorithm>/messages.csv``: one row per whole
MQTT message a node published (a chunked message is one row)::

    time_s,ack_s,sender,topic,bytes,qos,retain

``time_s`` and ``ack_s`` are seconds since the algorithm's run started when the publish
was issued and when it completed (broker acknowledgement for QoS 1); ``bytes`` counts MQTT
payload bytes, chunk headers included; ``qos`` and ``retain`` are 0 or 1.

The pure part (:func:`read_log`, :func:`summarize_log`, :func:`format_summary`) does no
I/O beyond reading the file and never touches asyncio or MQTT. :func:`replay_log`
publishes the logged traffic again through a broker. See ``docs/traffic.md``.
"""

from __future__ import annotations

import asyncio
import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emo_mqtt.errors import ConfigError, EmoError, TopicError
from emo_mqtt.msglog import COLUMNS  # the columns of a message log, as emo run writes them

#: Default width of the time buckets of :func:`summarize_log`, in seconds.
DEFAULT_BUCKET_S = 1.0


@dataclass(frozen=True, slots=True)
class LogRow:
    """One whole message of a message log (see the module docstring for the units)."""

    time_s: float
    ack_s: float
    sender: str
    topic: str
    bytes: int
    qos: int
    retain: bool


# ---------------------------------------------------------------------------- reading


def _seconds(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} is not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{column} must be a finite number >= 0: {text!r}")
    return value


def _integer(text: str, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{column} is not an integer: {text!r}") from None


def _flag(text: str, column: str, allowed: tuple[int, ...]) -> int:
    value = _integer(text, column)
    if value not in allowed:
        raise ValueError(f"{column} must be {' or '.join(map(str, allowed))}: {text!r}")
    return value


def _row(fields: dict[str, str]) -> LogRow:
    """One validated row; ``ValueError`` says what is wrong with it."""
    time_s = _seconds(fields["time_s"], "time_s")
    ack_s = _seconds(fields["ack_s"], "ack_s")
    if ack_s < time_s:
        raise ValueError(f"ack_s {ack_s} is before time_s {time_s}")
    sender = fields["sender"].strip()
    if not sender:
        raise ValueError("sender is empty")
    topic = fields["topic"]
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"topic is not a topic one can publish to: {topic!r}")
    nbytes = _integer(fields["bytes"], "bytes")
    if nbytes < 0:
        raise ValueError(f"bytes must be >= 0: {nbytes}")
    qos = _flag(fields["qos"], "qos", (0, 1))
    retain = _flag(fields["retain"], "retain", (0, 1))
    return LogRow(time_s, ack_s, sender, topic, nbytes, qos, bool(retain))


def read_log(path: str | Path) -> list[LogRow]:
    """Read and validate a message log; its rows in file order.

    The header must name every column of :data:`COLUMNS` (in any order; extra columns are
    ignored) and every row must have as many fields as the header. Blank lines are
    skipped. Anything else raises :class:`~emo_mqtt.errors.ConfigError` naming
    ``file:line`` and the problem.
    """
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the message log: {exc.strerror or exc}") from exc
    rows: list[LogRow] = []
    with handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise ConfigError(f"{path}:1: empty file, expected the header {','.join(COLUMNS)}")
            names = [name.strip() for name in header]
            missing = [c for c in COLUMNS if c not in names]
            if missing:
                raise ConfigError(
                    f"{path}:1: header lacks column(s) {', '.join(missing)} "
                    f"(expected {','.join(COLUMNS)})"
                )
            doubled = sorted({n for n in names if names.count(n) > 1})
            if doubled:
                raise ConfigError(f"{path}:1: header repeats column(s) {', '.join(doubled)}")
            for fields in reader:
                if not fields or all(not f.strip() for f in fields):
                    continue
                line = reader.line_num
                if len(fields) != len(names):
                    raise ConfigError(
                        f"{path}:{line}: {len(fields)} fields, expected "
                        f"{len(names)} ({','.join(names)})"
                    )
                try:
                    rows.append(_row(dict(zip(names, fields, strict=True))))
                except ValueError as exc:
                    raise ConfigError(f"{path}:{line}: {exc}") from None
        except csv.Error as exc:
            raise ConfigError(f"{path}:{reader.line_num}: not CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    return rows


# ---------------------------------------------------------------------------- summary


def byte_kind(topic: str) -> str:
    """The kind of bytes a topic's payload counts as (``emo_mqtt.nodes.base.BYTE_KINDS``);
    ``"other"`` for a topic outside the emo-mqtt grammar."""
    from emo_mqtt.nodes.base import BYTE_KINDS
    from emo_mqtt.topics import parse

    try:
        return BYTE_KINDS.get(parse(topic).kind, "other")
    except TopicError:
        return "other"


def _tally(table: dict[str, dict[str, int]], key: str, nbytes: int) -> None:
    entry = table.setdefault(key, {"messages": 0, "bytes": 0})
    entry["messages"] += 1
    entry["bytes"] += nbytes


def summarize_log(rows: Sequence[LogRow], bucket_s: float = DEFAULT_BUCKET_S) -> dict[str, Any]:
    """Totals of a message log, JSON-ready.

    Keys: ``messages``, ``bytes``, ``retained`` (messages), ``start_s`` (first publish),
    ``end_s`` (last acknowledgement), ``duration_s`` (``end_s - start_s``),
    ``bytes_per_s`` (over ``duration_s``), ``publish_s_mean``/``publish_s_max`` (``ack_s -
    time_s``), ``by_sender`` and ``by_kind`` (``{name: {"messages", "bytes"}}``, largest
    first) and ``buckets``: one ``{"start_s", "messages", "bytes"}`` per ``bucket_s``
    seconds of ``time_s`` from 0 to the last publish, empty ones included.
    """
    if not (math.isfinite(bucket_s) and bucket_s > 0):
        raise ConfigError(f"bucket_s must be a positive number of seconds: {bucket_s!r}")
    by_sender: dict[str, dict[str, int]] = {}
    by_kind: dict[str, dict[str, int]] = {}
    kinds: dict[str, str] = {}
    total = retained = 0
    for row in rows:
        total += row.bytes
        retained += row.retain
        _tally(by_sender, row.sender, row.bytes)
        if row.topic not in kinds:
            kinds[row.topic] = byte_kind(row.topic)
        _tally(by_kind, kinds[row.topic], row.bytes)
    buckets: list[dict[str, Any]] = []
    if rows:
        count = int(max(r.time_s for r in rows) // bucket_s) + 1
        buckets = [
            {"start_s": round(i * bucket_s, 6), "messages": 0, "bytes": 0} for i in range(count)
        ]
        for row in rows:
            bucket = buckets[min(int(row.time_s // bucket_s), count - 1)]
            bucket["messages"] += 1
            bucket["bytes"] += row.bytes
    start = min((r.time_s for r in rows), default=0.0)
    end = max((r.ack_s for r in rows), default=0.0)
    duration = end - start
    waits = [r.ack_s - r.time_s for r in rows]

    def largest_first(table: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return dict(sorted(table.items(), key=lambda item: (-item[1]["bytes"], item[0])))

    return {
        "messages": len(rows),
        "bytes": total,
        "retained": retained,
        "start_s": round(start, 6),
        "end_s": round(end, 6),
        "duration_s": round(duration, 6),
        "bytes_per_s": round(total / duration, 1) if duration > 0 else 0.0,
        "publish_s_mean": round(sum(waits) / len(waits), 6) if waits else 0.0,
        "publish_s_max": round(max(waits, default=0.0), 6),
        "by_sender": largest_first(by_sender),
        "by_kind": largest_first(by_kind),
        "bucket_s": bucket_s,
        "buckets": buckets,
    }


def _human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable table of :func:`summarize_log`'s result (decimal units: 1 MB = 10**6)."""
    total = summary["bytes"] or 1
    lines = [
        f"messages: {summary['messages']} ({summary['retained']} retained), "
        f"bytes: {summary['bytes']} ({_human(summary['bytes'])})",
        f"time: {summary['start_s']:.3f} s to {summary['end_s']:.3f} s "
        f"({summary['duration_s']:.3f} s, {_human(summary['bytes_per_s'])}/s); "
        f"publish took {summary['publish_s_mean']:.3f} s on average, "
        f"{summary['publish_s_max']:.3f} s at most",
    ]
    for title, key in (("kind", "by_kind"), ("sender", "by_sender")):
        table: dict[str, dict[str, int]] = summary[key]
        width = max([len(title), *map(len, table)])
        lines += ["", f"{title:<{width}} {'messages':>9} {'bytes':>13} {'share':>6}"]
        for name, entry in table.items():
            lines.append(
                f"{name:<{width}} {entry['messages']:>9} {entry['bytes']:>13} "
                f"{100 * entry['bytes'] / total:>5.1f}%"
            )
    buckets: list[dict[str, Any]] = summary["buckets"]
    if buckets:
        peak = max(b["bytes"] for b in buckets) or 1
        per = f"(per {summary['bucket_s']:g} s)"
        lines += ["", f"{'from (s)':>10} {'messages':>9} {'bytes':>13}  {per}"]
        for b in buckets:
            bar = "#" * round(30 * b["bytes"] / peak)
            lines.append(f"{b['start_s']:>10.3f} {b['messages']:>9} {b['bytes']:>13}  {bar}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- replay


def replay_run(topic: str, run: str | None) -> str | None:
    """The run segment ``topic`` gets in a replay, or ``None`` when it has none to rewrite.

    ``emo/<old>/...`` goes to ``run`` when given, else to ``<old>-replay``.
    """
    from emo_mqtt.topics import ROOT, validate_id

    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT or not parts[1]:
        return None
    return validate_id(run if run is not None else f"{parts[1]}-replay", "replay run")


def payload_size(wire_bytes: int, chunk_size: int) -> int:
    """The payload size whose publish puts ``wire_bytes`` MQTT payload bytes on the wire.

    The log counts chunk headers; the bus adds them again when it splits a payload larger
    than ``chunk_size``, so a chunked row's payload is its bytes less one header per frame.
    Sizes no split can produce (just above ``chunk_size``, or a last frame of header
    alone) round down to the nearest size that can be: by at most two chunk headers.
    """
    from emo_mqtt.chunking import HEADER_SIZE

    if wire_bytes <= chunk_size:
        return wire_bytes
    per_frame = chunk_size - HEADER_SIZE  # payload bytes in one full chunk frame
    frames = -(-wire_bytes // chunk_size)
    size = wire_bytes - frames * HEADER_SIZE
    # The largest payload that takes one frame fewer (one frame: up to chunk_size, unchunked).
    fewer = chunk_size if frames == 2 else (frames - 1) * per_frame
    return max(size, fewer)


async def replay_log(
    rows: Iterable[LogRow],
    broker_url: str,
    *,
    run: str | None,
    speed: float = 1.0,
    say: Callable[[str], None] = print,
    clear_retained: bool = True,
) -> dict[str, Any]:
    """Publish a message log's traffic again, with its timing, sizes, QoS and retain flags.

    Only sizes are logged, never content, so the replay reproduces the *traffic* (when,
    who, on which topic, how many bytes) but not the payloads: each message carries random
    bytes, which no node could decode. Each row is published at ``time_s / speed`` seconds
    after the replay starts, by one bus client per sender (client id
    ``<run>-replay-<sender>``): a sender's publishes start in log order, each at its own
    time, and never wait for the sender's earlier publishes to complete (nodes publish
    concurrently too), nor for any other sender's. Payload sizes are chosen so that the
    bytes on the wire, chunk headers included, equal the logged ``bytes``.

    The run segment of every topic (``emo/<run>/...``) is rewritten, to ``run`` when given,
    else to ``<old run>-replay``, so a replay never mixes with a live run; topics outside
    ``emo/<run>/`` are skipped and counted. A retained row larger than the bus's chunk size
    cannot be retained (it would be chunked): it is published non-retained and counted.
    With ``clear_retained`` the retained topics the replay set are cleared at the end.

    Returns ``messages``, ``bytes`` (MQTT payload bytes published), ``wall_s``,
    ``lag_s_max`` (how late the worst publish started against its schedule),
    ``by_sender`` (messages per sender), ``unretained`` (retained rows published
    non-retained), ``skipped`` (rows without a run segment) and ``runs`` (old -> new).
    """
    from emo_mqtt.bus import BusOptions, open_bus

    if not (math.isfinite(speed) and speed > 0):
        raise ConfigError(f"speed must be a positive number: {speed!r}")
    chunk_size = BusOptions().chunk_size
    runs: dict[str, str] = {}
    plans: dict[str, list[tuple[float, str, int, int, bool]]] = {}
    client_runs: dict[str, str] = {}
    skipped = unretained = 0
    for row in rows:
        new_run = replay_run(row.topic, run)
        if new_run is None:
            skipped += 1
            continue
        _root, old_run, rest = row.topic.split("/", 2)
        runs[old_run] = new_run
        retain = row.retain
        if retain and row.bytes > chunk_size:
            retain = False
            unretained += 1
        size = payload_size(row.bytes, chunk_size)
        client_runs.setdefault(row.sender, new_run)
        plans.setdefault(row.sender, []).append(
            (row.time_s / speed, f"emo/{new_run}/{rest}", size, row.qos, retain)
        )
    for plan in plans.values():
        plan.sort(key=lambda item: item[0])  # stable: log order among equal times
    total = sum(map(len, plans.values()))
    if skipped:
        say(f"replay: skipping {skipped} message(s) on topics outside emo/<run>/")
    if unretained:
        say(
            f"replay: {unretained} retained message(s) larger than the chunk size "
            f"({chunk_size} bytes) go out non-retained"
        )
    largest = max((size for plan in plans.values() for _t, _topic, size, _q, _r in plan), default=0)
    buffer = memoryview(os.urandom(largest))  # every payload is a prefix of it
    sent = {sender: 0 for sender in plans}
    published_bytes = {sender: 0 for sender in plans}
    step = max(1, math.ceil(total / 10))
    clock = _ReplayClock()
    connected: dict[str, asyncio.Event] = {sender: asyncio.Event() for sender in plans}
    say(
        f"replay: {total} messages from {len(plans)} sender(s) to {broker_url}, "
        f"runs {', '.join(f'{a} -> {b}' for a, b in runs.items()) or '-'}, speed {speed:g}"
    )

    async def replay_sender(sender: str, plan: list[tuple[float, str, int, int, bool]]) -> None:
        client_id = f"{client_runs[sender]}-replay-{sender}"
        retained: set[str] = set()
        async with open_bus(broker_url, client_id, clean_start=True) as bus:
            connected[sender].set()
            await clock.started.wait()

            async def publish(topic: str, size: int, qos: int, retain: bool) -> None:
                await bus.publish(topic, buffer[:size], qos=qos, retain=retain)
                sent[sender] += 1
                clock.done += 1
                clock.last = time.monotonic()
                if clock.done % step == 0 or clock.done == total:
                    say(
                        f"replay: {clock.done}/{total} messages "
                        f"({100 * clock.done // total}%), {clock.last - clock.start:.1f} s"
                    )

            async with asyncio.TaskGroup() as publishes:
                for at, topic, size, qos, retain in plan:
                    delay = clock.start + at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    clock.lag_max = max(clock.lag_max, time.monotonic() - clock.start - at)
                    if retain:
                        retained.add(topic)
                    publishes.create_task(publish(topic, size, qos, retain))
            published_bytes[sender] = bus.stats.published_bytes
            if clear_retained:
                for topic in sorted(retained):
                    await bus.publish(topic, b"", qos=1, retain=True)

    try:
        async with asyncio.TaskGroup() as group:
            for sender, plan in plans.items():
                group.create_task(replay_sender(sender, plan), name=f"replay:{sender}")
            # The clock starts once every client is connected: set-up is not lag.
            for event in connected.values():
                await event.wait()
            clock.start = clock.last = time.monotonic()
            clock.started.set()
    except ExceptionGroup as group_error:
        first = _first_emo_error(group_error)
        if first is None:
            raise
        raise first from group_error
    return {
        "messages": sum(sent.values()),
        "bytes": sum(published_bytes.values()),
        "wall_s": round(clock.last - clock.start, 3),
        "lag_s_max": round(clock.lag_max, 3),
        "speed": speed,
        "by_sender": dict(sorted(sent.items())),
        "unretained": unretained,
        "skipped": skipped,
        "runs": runs,
    }


class _ReplayClock:
    """The shared state of one replay's sender tasks (one event loop: no locks needed)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.start = 0.0  # time.monotonic() of the replay's time 0
        self.last = 0.0  # when the latest publish completed
        self.lag_max = 0.0
        self.done = 0


def _first_emo_error(group: BaseExceptionGroup[BaseException]) -> EmoError | None:
    """The first :class:`EmoError` in a (nested) exception group: what a user should see."""
    for error in group.exceptions:
        if isinstance(error, EmoError):
            return error
        if isinstance(error, BaseExceptionGroup):
            found = _first_emo_error(error)
            if found is not None:
                return found
    return None
