"""The device node: FedAvg client, SplitFed client, and (for EMO) activation publisher.

FL (``fl``, ``emo``, ``emo_all``): when the server's round announcement samples this
device, it loads the global model, trains locally and publishes its update. Under EMO it
also keeps, from the very forward passes of that training, the cut-layer activations of
the share of samples the controller allows, in a bounded outbox, and publishes them to its
overlay after the update: FL never waits for an overlay and nothing comes back.

SplitFed (``sfl``, ``sfl_v1``): the device holds only the trunk; for every batch it sends
the activations up and waits for their gradient before its backward pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

from emo_mqtt.bus import BusOptions
from emo_mqtt.cache import ActivationBatch, DeviceOutbox
from emo_mqtt.codec import Envelope
from emo_mqtt.config import RunConfig
from emo_mqtt.controller import ControlDecision, select_for_publish
from emo_mqtt.data import Split
from emo_mqtt.errors import EmoError
from emo_mqtt.models import build_fl_model, load_numpy_state, state_to_numpy
from emo_mqtt.nodes.base import Node, wait_event
from emo_mqtt.nodes.compute import compute
from emo_mqtt.topics import Kind, ParsedTopic, topic
from emo_mqtt.training import make_generator, make_rng, sfl_device_backward, train_local

log = logging.getLogger("emo_mqtt.nodes.device")

EMO_ALGORITHMS = ("emo", "emo_all")
SFL_ALGORITHMS = ("sfl", "sfl_v1")
P = ParamSpec("P")
R = TypeVar("R")


class DeviceNode(Node):
    """One IoT device of the fleet."""

    role = "device"

    def __init__(
        self, broker: Any, config: RunConfig, run: str, node_id: str, algorithm: str, data: Split,
        *, bus_options: BusOptions | None = None,
    ) -> None:
        super().__init__(broker, config, run, node_id, bus_options)
        #: Training speed relative to this machine: slower devices wait out the difference.
        self.compute_speed = config.compute_speed(node_id)
        #: Seconds spent computing, and seconds waited to emulate a slower device.
        self.compute_busy_s = 0.0
        self.compute_wait_s = 0.0
        self.algorithm = algorithm
        self.data = data
        # The model of the round being trained. Each round trains a fresh instance: a round
        # overtaken by the next one may still be running in its worker thread (threads cannot
        # be cancelled), and must not share weights or an outbox with its successor.
        self.model = build_fl_model(config.fl.model)
        self.overlay = config.overlay_of(node_id)
        # Before the first control message: the controller's warm-up rate.
        policy = config.controller.policy()
        self.decision = ControlDecision(policy.max_fraction, policy.warmup_precision, 1,
                                        "initial")
        self.decision_round = 0
        self._decision_event = asyncio.Event()
        self.outbox: DeviceOutbox[ActivationBatch] = self._new_outbox()
        self.outbox_evicted = 0
        self._training: asyncio.Task[None] | None = None
        #: Activations go up one round at a time, beside the rounds (see _queue_activations):
        #: the round whose activations wait for the link, and the task sending them.
        self._pending_activations: tuple[int, DeviceOutbox[ActivationBatch]] | None = None
        self._activation_sender: asyncio.Task[None] | None = None
        #: Rounds of activations dropped unsent because the uplink had not caught up.
        self.activation_rounds_dropped = 0
        self._gradients: dict[tuple[int, int], asyncio.Future[torch.Tensor]] = {}
        self.activation_bytes = 0
        self.rounds_trained = 0
        self.last_loss = math.nan  # mean local training loss of the last round trained
        #: (round, body) of the last update published: sent again when a restarted server
        #: announces that round anew (see :meth:`_on_round`).
        self._last_update: tuple[int, dict[str, Any]] | None = None
        self.on(Kind.SERVER_ROUND, self._on_round)
        self.on(Kind.SERVER_DONE, self._on_done)
        self.on(Kind.CONTROL, self._on_control)
        self.on(Kind.SERVER_SFL_GRADIENTS, self._on_gradient)

    async def subscriptions(self) -> list[str]:
        subs = [topic(Kind.SERVER_ROUND, self.run), topic(Kind.SERVER_DONE, self.run)]
        if self.algorithm in EMO_ALGORITHMS:
            subs.append(topic(Kind.CONTROL, self.run, node=self.node_id))
        if self.algorithm in SFL_ALGORITHMS:
            subs.append(topic(Kind.SERVER_SFL_GRADIENTS, self.run, node=self.node_id))
        return subs

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        out.update(
            algorithm=self.algorithm,
            rounds_trained=self.rounds_trained,
            loss=self.last_loss,
            activation_bytes=self.activation_bytes,
            outbox_bytes=self.outbox.bytes,
            outbox_evicted=self.outbox_evicted + self.outbox.stats.evicted,
            decision=self.decision.to_dict(),
            decision_round=self.decision_round,
            activation_rounds_dropped=self.activation_rounds_dropped,
            compute_speed=self.compute_speed,
            compute_busy_s=round(self.compute_busy_s, 3),
            compute_wait_s=round(self.compute_wait_s, 3),
        )
        return out

    # -- handlers ---------------------------------------------------------------------------
    async def _on_round(self, where: ParsedTopic, env: Envelope) -> None:
        r = int(env.body["round"])
        if r == self.round and self._last_update is not None and self._last_update[0] == r:
            # The same round announced by a new envelope (exact redeliveries are dropped as
            # duplicates before any handler): a server that restarted from its checkpoint
            # and may have lost our update with its old session. Send it again; a server
            # that has it already counts it as a duplicate, never twice.
            self.spawn(self.send(Kind.DEVICE_UPDATE, self._last_update[1], msg_kind="update",
                                 node=self.node_id))
            return
        if r <= self.round:
            return  # a retained announcement we already handled
        self.round = r
        if self.node_id not in env.body["sampled"]:
            return
        if self._training is not None and not self._training.done():
            # A new round started before we finished: the server has closed the old one.
            self._training.cancel()
        weights = env.body["weights"]
        self._training = asyncio.create_task(self._train_round(r, weights))

    async def _on_done(self, where: ParsedTopic, env: Envelope) -> None:
        self.stop()

    async def _on_control(self, where: ParsedTopic, env: Envelope) -> None:
        r = int(env.body["round"])
        if r >= self.decision_round:
            self.decision = ControlDecision.from_dict(env.body["decision"])
            self.decision_round = r
            self._decision_event.set()

    async def _on_gradient(self, where: ParsedTopic, env: Envelope) -> None:
        key = (int(env.body["round"]), int(env.body["batch"]))
        future = self._gradients.get(key)
        if future is None or future.done():
            self.bus.reject("stale_gradient", topic(Kind.SERVER_SFL_GRADIENTS, self.run,
                                                    node=self.node_id), f"no batch {key}")
            return
        future.set_result(torch.as_tensor(np.asarray(env.body["gradient"])))

    async def main(self) -> None:
        await self.stopping.wait()
        if self._training is not None and not self._training.done():
            self._training.cancel()
        if self._activation_sender is not None:  # the run is over: no overlay trains any more
            self._activation_sender.cancel()

    def _queue_activations(self, r: int, outbox: DeviceOutbox[ActivationBatch]) -> None:
        """Send round ``r``'s activations when the link is free; older unsent ones are dropped.

        Activations go beside the rounds, not in them: the next round's announcement cancels
        a round's task, and on a slow uplink it comes while the activations are still going
        up. They go one round at a time: were every round's batch sent at once, a link that
        cannot keep up would share itself between ever more transfers and finish none. The
        device tier keeps only the freshest round waiting (IoT memory is small, and the
        overlays value fresh activations most); a dropped round is counted.
        """
        if self._pending_activations is not None:
            self.activation_rounds_dropped += 1
        self._pending_activations = (r, outbox)
        if self._activation_sender is None or self._activation_sender.done():
            self._activation_sender = asyncio.create_task(self._send_activations())

    async def _send_activations(self) -> None:
        while self._pending_activations is not None:
            r, outbox = self._pending_activations
            self._pending_activations = None
            try:
                await self._flush_outbox(r, outbox)
            except EmoError as exc:  # a publish timed out or the bus closed: try the next
                log.warning("device %s: round %d activations not published: %s",
                            self.node_id, r, exc)

    # -- training ---------------------------------------------------------------------------
    async def _train_round(self, r: int, weights: dict[str, np.ndarray]) -> None:
        try:
            if self.algorithm in SFL_ALGORITHMS:
                await self._sfl_round(r, weights)
            else:
                await self._fl_round(r, weights)
            self.rounds_trained += 1
            await self.publish_metrics()
        except asyncio.CancelledError:
            raise
        except EmoError as exc:
            log.warning("device %s: round %d failed: %s", self.node_id, r, exc)

    async def _current_decision(self, r: int) -> ControlDecision:
        """The controller's decision for round ``r`` (published just before the round)."""
        if self.algorithm == "emo_all":
            return ControlDecision(1.0, "fp32", 1, "send-everything")
        deadline = asyncio.get_running_loop().time() + 2.0
        while self.decision_round < r and asyncio.get_running_loop().time() < deadline:
            await wait_event(self._decision_event, 0.2)
        return self.decision

    async def _emulate_speed(self, busy_s: float) -> None:
        """After ``busy_s`` seconds of computing, wait as long as a slower device would have."""
        self.compute_busy_s += busy_s
        if self.compute_speed < 1:
            wait = busy_s * (1 / self.compute_speed - 1)
            self.compute_wait_s += wait
            await asyncio.sleep(wait)

    def _new_outbox(self) -> DeviceOutbox[ActivationBatch]:
        return DeviceOutbox(self.config.emo.outbox_kib * 1024)

    async def _fl_round(self, r: int, weights: dict[str, np.ndarray]) -> None:
        model = build_fl_model(self.config.fl.model)
        load_numpy_state(model, weights)
        self.model = model
        self.outbox_evicted += self.outbox.stats.evicted
        outbox = self.outbox = self._new_outbox()
        c = self.config
        capture = None
        if self.algorithm in EMO_ALGORITHMS:
            decision = await self._current_decision(r)
            # Its own stream: what is published never touches the training RNG.
            rng = make_rng(c.run.seed, "activations", self.node_id, r)
            batch_index = 0

            def capture(idx: np.ndarray, acts: torch.Tensor, labels: np.ndarray) -> None:
                nonlocal batch_index
                chosen = select_for_publish(decision, batch_index, len(idx), rng)
                batch_index += 1
                if chosen.size:
                    outbox.push(ActivationBatch.quantize(
                        r, idx[chosen], acts.numpy()[chosen], labels[chosen], decision.precision))

        report, busy_s = await compute(
            _timed,
            train_local,
            model,
            self.data,
            epochs=c.fl.local_epochs,
            batch_size=c.fl.batch_size,
            lr=c.fl.lr,
            momentum=c.fl.momentum,
            generator=make_generator(c.run.seed, "train", self.node_id, r),
            on_activations=capture,
        )
        await self._emulate_speed(busy_s)
        self.last_loss = float(report.loss)
        update = {"round": r, "weights": state_to_numpy(model), "samples": report.samples,
                  "loss": report.loss}
        self._last_update = (r, update)
        await self.send(Kind.DEVICE_UPDATE, update, msg_kind="update", node=self.node_id)
        if capture is not None:
            self._queue_activations(r, outbox)

    async def _flush_outbox(self, r: int, outbox: DeviceOutbox[ActivationBatch]) -> None:
        """Publish this round's activations in one message (chunked by the bus if large)."""
        batches = outbox.pop_all()
        if batches:
            ids = np.concatenate([b.sample_ids for b in batches])
            labels = np.concatenate([b.labels for b in batches])
            data = np.concatenate([b.data for b in batches])
            scales = [b.scale for b in batches if b.scale is not None]
            scale = np.concatenate(scales) if len(scales) == len(batches) else None
        else:
            ids = np.zeros(0, dtype=np.int64)
            labels = np.zeros(0, dtype=np.int64)
            data = np.zeros((0, *self.model.activation_shape), dtype=np.float32)
            scale = None
        body = {"round": r, "sample_ids": ids, "labels": labels, "data": data, "scale": scale,
                "last": True}
        self.activation_bytes += int(data.nbytes + ids.nbytes + labels.nbytes
                                     + (0 if scale is None else scale.nbytes))
        # In the background: on a slow uplink, the next round's FL update must not queue
        # behind megabytes of activations (FL never waits for the overlays).
        await self.send(Kind.DEVICE_ACTIVATIONS, body, msg_kind="activations", node=self.node_id,
                        background=True)

    async def _sfl_round(self, r: int, weights: dict[str, np.ndarray]) -> None:
        self.model = build_fl_model(self.config.fl.model)
        trunk = self.model.trunk
        load_numpy_state(trunk, weights)
        c = self.config
        optimizer = torch.optim.SGD(trunk.parameters(), lr=c.sfl.lr)
        generator = make_generator(c.run.seed, "train", self.node_id, r)
        x_all = torch.tensor(np.asarray(self.data.x))
        y_all = torch.tensor(np.asarray(self.data.y))
        n = len(self.data)
        loop = asyncio.get_running_loop()
        batch = 0
        trunk.train()
        for _ in range(c.fl.local_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, c.fl.batch_size):
                idx = order[start : start + c.fl.batch_size]
                began = time.perf_counter()
                acts = trunk(x_all[idx])
                await self._emulate_speed(time.perf_counter() - began)
                future: asyncio.Future[torch.Tensor] = loop.create_future()
                self._gradients[(r, batch)] = future
                await self.send(
                    Kind.DEVICE_SFL_ACTIVATIONS,
                    {"round": r, "batch": batch, "activations": acts.detach(),
                     "labels": y_all[idx]},
                    msg_kind="sfl.activations",
                    node=self.node_id,
                )
                try:
                    grad = await asyncio.wait_for(future, c.sfl.gradient_timeout_s)
                except TimeoutError:
                    raise EmoError(f"no gradient for round {r} batch {batch}") from None
                finally:
                    self._gradients.pop((r, batch), None)
                began = time.perf_counter()
                sfl_device_backward(acts, grad, optimizer)
                await self._emulate_speed(time.perf_counter() - began)
                batch += 1
        update = {"round": r, "weights": state_to_numpy(trunk), "samples": n * c.fl.local_epochs,
                  "loss": math.nan}
        self._last_update = (r, update)
        await self.send(Kind.DEVICE_UPDATE, update, msg_kind="update", node=self.node_id)


def _timed(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[R, float]:
    """``fn``'s result and the seconds it took (run in the compute pool: queueing excluded)."""
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - began
