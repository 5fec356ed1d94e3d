"""Worker processes for large fleets: ``emo run --workers N``.

One Python process runs out of event loop long before a thousand MQTT clients run out of
broker: every client's handshakes, keep-alives and acknowledgements are handled by the one
loop. ``emo run --workers N`` keeps the server (and the monitor) in the launching process
and deals the devices and overlays to ``N`` worker processes (:func:`emo_mqtt.placement.assign`),
each running its share as asyncio tasks of its own loop, every node with its own MQTT
connection, exactly as in one process.

What crosses a process boundary is plain data only: the scenario as its config dict, node
ids, broker URLs, the run's incarnation going in; a status and the message log's rows
(tuples of numbers and strings) coming out. MQTT payloads never do: the nodes talk to each
other through the broker, msgpack on the wire, wherever they run.

Workers are started with the standard library's ``multiprocessing`` (``spawn``: a fresh
interpreter, never a fork of a process with running threads and an event loop). A worker
that fails ends with its error as text, and the launcher fails the run with it; a cancelled
run (SIGINT, SIGTERM) terminates its workers, whose nodes' wills then say ``offline``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from emo_mqtt.bus import BusOptions
from emo_mqtt.config import from_dict
from emo_mqtt.dataplan import plan_data
from emo_mqtt.errors import EmoError
from emo_mqtt.msglog import MessageLog
from emo_mqtt.placement import FLEET_PUBLISH_TIMEOUT_S, BrokerMap, start_concurrency

log = logging.getLogger("emo_mqtt.workers")

#: Seconds a terminated worker gets to exit before it is killed.
_TERMINATE_GRACE_S = 5.0
#: How often the launcher looks at a worker process (a cancellable poll, not a blocked thread).
_POLL_S = 0.1

Row = tuple[float, float, str, str, int, int, int]


class WorkerFailed(EmoError):
    """A worker process ended with an error (its message names the worker and the error)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain picklable data (never an MQTT payload)."""

    index: int
    #: The scenario as :meth:`~emo_mqtt.config.RunConfig.to_dict` writes it, and its source.
    config: dict[str, Any]
    source: str
    algorithm: str
    #: The devices and overlays this worker runs.
    nodes: tuple[str, ...]
    brokers: BrokerMap
    #: The server start the nodes follow (:mod:`emo_mqtt.incarnation`).
    incarnation: str
    out_dir: str | None
    #: ``time.monotonic()`` of the run's start in the launcher (the message log's zero;
    #: the monotonic clock is system-wide on Linux and macOS).
    log_origin: float
    #: Device trainings at once in this worker (its compute pool), and torch's intra-op
    #: threads: one each by default, since the workers already share the cores.
    parallel_training: int = 1
    torch_threads: int = 1
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class WorkerResult:
    """What a worker sends back when its nodes are done."""

    index: int
    nodes: int
    rows: list[Row]
    wall_s: float


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process: run its nodes until the run ends, report back."""
    # The launcher decides when a run stops: a Ctrl-C in the terminal reaches the whole
    # process group, and the launcher terminates us in order (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import torch

        torch.set_num_threads(spec.torch_threads)
        began = time.monotonic()
        rows = asyncio.run(_serve(spec))
        conn.send(("ok", WorkerResult(spec.index, len(spec.nodes), rows, time.monotonic() - began)))
    except BaseException as exc:  # reported as text: the launcher raises WorkerFailed
        log.exception("worker %d failed", spec.index)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _serve(spec: WorkerSpec) -> list[Row]:
    """Build this worker's nodes, run them to the end of the run; the message log's rows."""
    # Imported here: the fleet module imports this one for its worker path.
    from emo_mqtt.fleet import build_node, warm_up
    from emo_mqtt.nodes import compute

    config = from_dict(spec.config, spec.source)
    devices = set(config.device_ids())
    compute.configure(spec.parallel_training)
    # Only this worker's devices' data is materialised (the rest is never touched here).
    plan = plan_data(config, only=[n for n in spec.nodes if n in devices])
    if plan.devices:
        await warm_up(config, plan)
    msglog = MessageLog(origin=spec.log_origin)
    gate = asyncio.Semaphore(start_concurrency(len(spec.nodes)))
    out_dir = None if spec.out_dir is None else Path(spec.out_dir)
    nodes = []
    for node_id in spec.nodes:
        node = build_node(
            spec.brokers.broker_for(node_id),
            config,
            spec.algorithm,
            plan,
            node_id,
            out_dir,
            incarnation=spec.incarnation,
            bus_options=BusOptions(publish_timeout_s=FLEET_PUBLISH_TIMEOUT_S),
        )
        node.start_gate = gate
        node.bus.on_published = msglog.recorder(node_id)
        nodes.append(node)
    tasks = {
        asyncio.create_task(n.run_node(), name=f"{n.role}:{n.node_id}"): n.node_id for n in nodes
    }
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise WorkerFailed(f"{task.get_name()} failed: {task.exception()!r}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return msglog.rows


async def run_worker(spec: WorkerSpec, msglog: MessageLog | None = None) -> None:
    """Start the worker of ``spec`` and wait for it (cancellable); its rows go to ``msglog``.

    Raises :class:`WorkerFailed` when the worker reports an error or dies without a word;
    cancelling terminates the process (killed if it has not exited after a grace period).
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=worker_main, args=(spec, child), name=f"emo-worker-{spec.index}", daemon=True
    )
    proc.start()
    child.close()  # ours no more: the pipe reports EOF when the worker is gone
    reply: tuple[str, Any] | None = None
    try:
        while reply is None:
            if parent.poll():
                try:
                    reply = parent.recv()
                except EOFError:
                    break
            elif not proc.is_alive():
                if parent.poll():
                    continue  # it wrote its reply just before it exited
                break
            else:
                await asyncio.sleep(_POLL_S)
    finally:
        if reply is None or proc.is_alive():
            await _stop(proc, wait=reply is not None)
        parent.close()
    if reply is None:
        raise WorkerFailed(f"worker {spec.index} died (exit code {proc.exitcode})")
    status, body = reply
    if status != "ok":
        raise WorkerFailed(f"worker {spec.index}: {body}")
    assert isinstance(body, WorkerResult)
    if msglog is not None:
        msglog.rows.extend(body.rows)
    log.info("worker %d: %d nodes done in %.1f s", spec.index, body.nodes, body.wall_s)


async def _stop(proc: multiprocessing.process.BaseProcess, *, wait: bool) -> None:
    """End ``proc``: let it exit on its own first when it already replied (``wait``),
    else terminate it, and kill it if it outlives the grace period."""
    if not wait:
        proc.terminate()
    # In a thread: the join blocks, and the event loop has other workers to stop.
    await asyncio.to_thread(proc.join, _TERMINATE_GRACE_S)
    if proc.is_alive() and wait:
        proc.terminate()
        await asyncio.to_thread(proc.join, _TERMINATE_GRACE_S)
    if proc.is_alive():
        proc.kill()
        await asyncio.to_thread(proc.join, _TERMINATE_GRACE_S)
