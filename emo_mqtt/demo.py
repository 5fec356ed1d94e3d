"""``emo demo``: real tensors moving between nodes through a broker, and what happened.

Each device builds a small torch model with its own seed and publishes its weights to the
server and a batch of cut-layer-sized activations (large enough to be chunked) to the
overlay. The server averages the weights and publishes the result; the overlay and every
device check what they received bit for bit. Each node has its own bus connection: they
share nothing but the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from emo_mqtt import codec
from emo_mqtt.bus import Bus, open_bus
from emo_mqtt.errors import EmoError
from emo_mqtt.topics import Kind, subscription, topic

RUN = "demo"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4608, 10)
    )


def _activations(seed: int) -> torch.Tensor:
    # 1024 samples of a 16x4x4 cut layer in float32: 1 MiB, above the 512 KiB chunk size.
    return torch.randn(1024, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


async def _collect(bus: Bus, count: int) -> list[codec.Envelope]:
    got = []
    async for message in bus.messages():
        got.append(codec.decode(message.payload))
        if len(got) == count:
            break
    return got


async def run_demo(
    url: str, devices: int = 4, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run one server, one overlay and ``devices`` devices on ``url``; return a summary."""
    if devices < 1:
        raise EmoError("the demo needs at least one device")
    start = time.perf_counter()
    server = open_bus(url, f"{RUN}-server", clean_start=True)
    overlay = open_bus(url, f"{RUN}-overlay", clean_start=True)
    nodes = [open_bus(url, f"{RUN}-device-{i}", clean_start=True) for i in range(devices)]
    buses = [server, overlay, *nodes]
    try:
        # Concurrently: against a 3.1.1-only broker each connect first probes MQTT 5.
        await asyncio.gather(*(bus.connect() for bus in buses))
        await server.subscribe(subscription(Kind.DEVICE_UPDATE, RUN))
        await overlay.subscribe(subscription(Kind.DEVICE_ACTIVATIONS, RUN))
        for bus in nodes:
            await bus.subscribe(topic(Kind.SERVER_DONE, RUN))
        say(f"demo: 1 server, 1 overlay, {devices} devices connected")

        updates = asyncio.create_task(_collect(server, devices))
        batches = asyncio.create_task(_collect(overlay, devices))
        for i, bus in enumerate(nodes):
            state = {k: v.detach() for k, v in _model(seed=i).state_dict().items()}
            device = f"device-{i}"
            await bus.publish(
                topic(Kind.DEVICE_UPDATE, RUN, node=device),
                codec.encode(
                    {"weights": state, "samples": 100 * (i + 1)},
                    kind="update",
                    sender=device,
                    run=RUN,
                    seq=0,
                ),
            )
            await bus.publish(
                topic(Kind.DEVICE_ACTIVATIONS, RUN, node=device),
                codec.encode(
                    {"activations": _activations(i), "round": 0},
                    kind="activations",
                    sender=device,
                    run=RUN,
                    seq=1,
                ),
            )
            say(f"{device}: published its weights and a 1 MiB activation batch")

        received = await asyncio.wait_for(updates, timeout=60)
        weights = [e.body["samples"] for e in received]
        average = {
            name: sum(
                e.body["weights"][name] * (n / sum(weights))
                for e, n in zip(received, weights, strict=True)
            )
            for name in received[0].body["weights"]
        }
        parameters = sum(value.numel() for value in average.values())
        say(f"server: averaged {len(received)} updates of {parameters} parameters")

        activations = await asyncio.wait_for(batches, timeout=60)
        for envelope in activations:
            index = int(envelope.sender.rsplit("-", 1)[1])
            if not torch.equal(envelope.body["activations"], _activations(index)):
                raise EmoError(f"activations from {envelope.sender} arrived altered")
        say(f"overlay: received {len(activations)} activation batches, bit-identical")

        done = [asyncio.create_task(_collect(bus, 1)) for bus in nodes]
        await server.publish(
            topic(Kind.SERVER_DONE, RUN),
            codec.encode({"weights": average}, kind="done", sender="server", run=RUN),
            retain=False,
        )
        for task in done:
            (envelope,) = await asyncio.wait_for(task, timeout=60)
            for name, value in average.items():
                if not torch.equal(envelope.body["weights"][name], value):
                    raise EmoError("the global model arrived altered")
        say(f"devices: all {devices} received the averaged model, bit-identical")
    finally:
        for bus in buses:
            await bus.close()
    elapsed = time.perf_counter() - start
    sent = sum(b.stats.published_bytes for b in buses)
    frames = sum(b.stats.published_frames for b in buses)
    messages = sum(b.stats.published_messages for b in buses)
    summary = {
        "broker": url,
        "nodes": len(buses),
        "messages": messages,
        "frames": frames,
        "bytes": sent,
        "elapsed_s": round(elapsed, 3),
        "rejected": sum(sum(b.stats.rejected.values()) for b in buses),
        "mean_weight": float(np.mean([v.float().mean().item() for v in average.values()])),
    }
    say(
        f"demo: {messages} messages in {frames} MQTT frames, {sent / 1e6:.1f} MB, "
        f"{elapsed:.2f} s, {summary['rejected']} rejected"
    )
    return summary
