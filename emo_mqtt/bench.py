"""Benchmarks of the bus and the codec (``emo bench bus``, ``emo bench codec``).

The bus benchmark sends ``count`` float32 tensors of ``size`` bytes through the whole path
(encode, chunk, publish, receive, reassemble, decode) from one bus client to another, and
in the same run the same number of raw payloads of the same size from a bare aiomqtt
client to another at QoS 1 (the reference). Both sides publish one message at a time,
each publish awaited until the broker acknowledged it, and the clock stops when the
subscriber holds the last message. Runs alternate between the two so that machine noise
hits both alike; the median of the repeats is reported, in MB/s and in messages/s (the
figure that counts for small messages).

On a broker that caps packets below the payload, the reference publishes each payload as
consecutive frames of the bus's chunk size (which such a broker takes), and the result
says so (``baseline_frame_bytes``). ``plain=True`` measures the bus's fallback that uses
aiomqtt's public API only (``EMO_MQTT_PLAIN``).
"""

from __future__ import annotations

import asyncio
import pickle
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from emo_mqtt import codec
from emo_mqtt.bus import BusOptions, open_bus
from emo_mqtt.errors import BusError, ConfigError
from emo_mqtt.topics import Kind, topic


@dataclass(frozen=True, slots=True)
class BusRun:
    """One measured transfer of ``messages`` payloads."""

    messages: int
    payload_bytes: int
    wire_bytes: int
    elapsed_s: float

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / self.elapsed_s / 1e6

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.elapsed_s


def _tensor(size: int, seed: int = 0) -> np.ndarray[Any, Any]:
    if size % 4:
        raise ConfigError(f"size must be a multiple of 4 bytes (float32 elements), not {size}")
    return np.random.default_rng(seed).standard_normal(size // 4, dtype=np.float32)


async def emo_bus_run(
    url: str,
    size: int,
    count: int,
    *,
    chunk_size: int | None = None,
    run: str = "bench",
    plain: bool = False,
) -> BusRun:
    """Send ``count`` tensors of ``size`` bytes through two emo buses; time the whole path.

    ``plain``: the bus's fallback on aiomqtt's public API instead of its fast client.
    """
    # The receiver must accept one tensor of this size from one sender.
    budget = max(BusOptions().reassembly_max_sender_bytes, 2 * size)
    options = BusOptions(reassembly_max_sender_bytes=budget)
    if chunk_size is not None:
        options = replace(options, chunk_size=chunk_size)
    tensor = _tensor(size)
    where = topic(Kind.BENCH, run, node="data")
    pub = open_bus(url, f"{run}-pub", clean_start=True, options=options, plain=plain)
    sub = open_bus(url, f"{run}-sub", clean_start=True, options=options, plain=plain)
    async with pub, sub:
        await sub.subscribe(where, qos=1)
        received = 0

        async def consume() -> None:
            nonlocal received
            async for message in sub.messages():
                envelope = codec.decode(message.payload)
                got = envelope.body["tensor"]
                if got.nbytes != size:
                    raise BusError(f"bench: received {got.nbytes} bytes, sent {size}")
                received += 1
                if received == count:
                    return

        consumer = asyncio.create_task(consume())
        start = time.perf_counter()
        for seq in range(count):
            frame = codec.encode({"tensor": tensor}, kind="bench", sender=pub.client_id, seq=seq)
            await pub.publish(where, frame, qos=1)
        await asyncio.wait_for(consumer, timeout=60 + size * count / 1e6)
        elapsed = time.perf_counter() - start
        return BusRun(count, size * count, pub.stats.published_bytes, elapsed)


async def bare_run(
    url: str, size: int, count: int, *, run: str = "bench", frame_size: int | None = None
) -> BusRun:
    """The reference: raw payloads between two bare aiomqtt clients at QoS 1.

    ``frame_size``: publish each payload as consecutive frames of at most that many bytes.
    """
    from emo_mqtt.bus.mqtt import bare_aiomqtt_transfer

    payload = _tensor(size).tobytes()
    where = topic(Kind.BENCH, run, node="bare")
    elapsed = await bare_aiomqtt_transfer(url, where, payload, count, frame_size)
    return BusRun(count, size * count, size * count, elapsed)


async def reference_frame_size(url: str, size: int, chunk_size: int) -> int | None:
    """None when the broker takes ``size``-byte publishes whole, else the frame size the
    bare reference uses instead: the bus's own ``chunk_size``."""
    from emo_mqtt.bus.mqtt import bare_aiomqtt_accepts

    if size <= chunk_size:
        return None
    where = topic(Kind.BENCH, "bench", node="probe")
    return None if await bare_aiomqtt_accepts(url, where, size + 1024) else chunk_size


async def bench_bus(
    url: str,
    size: int,
    count: int,
    *,
    repeats: int = 3,
    chunk_size: int | None = None,
    baseline: bool = True,
    progress: Callable[[str], None] | None = None,
    plain: bool = False,
) -> dict[str, Any]:
    """Alternate emo and bare runs ``repeats`` times; report medians as one JSON-ready dict.

    ``plain``: measure the bus's fallback on aiomqtt's public API (``EMO_MQTT_PLAIN``).
    """
    effective_chunk = chunk_size or BusOptions().chunk_size
    frame: int | None = None
    if baseline:
        frame = await reference_frame_size(url, size, effective_chunk)
    # One short warm-up of each path: the first connection and allocation are not the bus.
    await emo_bus_run(url, size, min(count, 2), chunk_size=chunk_size, plain=plain)
    if baseline:
        await bare_run(url, size, min(count, 2), frame_size=frame)
    ours: list[BusRun] = []
    bare: list[BusRun] = []
    for i in range(repeats):
        ours.append(await emo_bus_run(url, size, count, chunk_size=chunk_size, plain=plain))
        if baseline:
            bare.append(await bare_run(url, size, count, frame_size=frame))
        if progress is not None:
            line = f"repeat {i + 1}/{repeats}: emo {_rates(ours[-1])}"
            if baseline:
                line += f", bare aiomqtt {_rates(bare[-1])}"
            progress(line)
    median = statistics.median(r.mb_per_s for r in ours)
    result: dict[str, Any] = {
        "mb_per_s": round(median, 1),
        "msgs_per_s": round(statistics.median(r.msgs_per_s for r in ours), 1),
        "messages": count,
        "bytes": size * count,
        "size": size,
        "wire_bytes": ours[0].wire_bytes,
        "chunk_size": effective_chunk,
        "client": "plain" if plain else "fast",
        "repeats": repeats,
        "runs_mb_per_s": [round(r.mb_per_s, 1) for r in ours],
        "runs_msgs_per_s": [round(r.msgs_per_s, 1) for r in ours],
    }
    if baseline:
        bare_median = statistics.median(r.mb_per_s for r in bare)
        result["baseline_bare_aiomqtt_mb_per_s"] = round(bare_median, 1)
        result["baseline_msgs_per_s"] = round(statistics.median(r.msgs_per_s for r in bare), 1)
        result["baseline_runs_mb_per_s"] = [round(r.mb_per_s, 1) for r in bare]
        result["baseline_runs_msgs_per_s"] = [round(r.msgs_per_s, 1) for r in bare]
        # Each repeat's emo run and bare run are neighbours in time: their ratio is the
        # figure least disturbed by a machine whose load changes from one repeat to the next.
        result["paired_ratios"] = [
            round(o.mb_per_s / b.mb_per_s, 3) for o, b in zip(ours, bare, strict=True)
        ]
        result["baseline_frame_bytes"] = size if frame is None else frame
        result["baseline_note"] = (
            "bare aiomqtt publishes each payload whole"
            if frame is None
            else f"the broker refused a {size}-byte publish: bare aiomqtt publishes each "
            f"payload as {-(-size // frame)} consecutive frames of at most {frame} bytes"
        )
        # The same payloads and counts on both sides: one ratio for MB/s and messages/s.
        result["ratio_vs_bare"] = round(median / bare_median, 3)
    return result


def _rates(run: BusRun) -> str:
    return f"{run.mb_per_s:.1f} MB/s ({run.msgs_per_s:.0f} messages/s)"


def _rate(fn: Callable[[], object], nbytes: int, repeat: int = 15) -> float:
    """MB/s of ``fn``: the median of ``repeat`` timed calls, after one warm-up call.

    Every output is kept alive, as a receiver that keeps what it decodes does: otherwise the
    allocator hands the same hot pages back each call and copies look several times faster
    than on fresh memory (about 14 GB/s against 2.3 GB/s on this project's CI machine).
    """
    fn()
    kept = []
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        kept.append(fn())
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e6


def bench_codec(sizes: tuple[int, ...] = (100_000, 1_000_000, 10_000_000)) -> list[dict[str, Any]]:
    """Encode/decode MB/s of the codec against pickle (protocol 5) on the same tensors.

    Decoding a numpy array is a zero-copy view over the received frame, so its figure is
    the cost of parsing the envelope, not of moving the bytes.
    """
    import torch

    rows = []
    for size in sizes:
        array = _tensor(size)
        for origin, value in (("numpy", array), ("torch", torch.from_numpy(array.copy()))):
            frame = codec.encode({"tensor": value}, kind="bench")
            pickled = pickle.dumps(value, protocol=5)
            timed: dict[str, Callable[[], object]] = {
                "encode_mb_s": partial(codec.encode, {"tensor": value}, kind="b"),
                "decode_mb_s": partial(codec.decode, frame),
                "pickle_dumps_mb_s": partial(pickle.dumps, value, protocol=5),
                "pickle_loads_mb_s": partial(pickle.loads, pickled),
            }
            row: dict[str, Any] = {"size_bytes": size, "origin": origin}
            row.update({name: round(_rate(fn, size)) for name, fn in timed.items()})
            rows.append(row)
    return rows
