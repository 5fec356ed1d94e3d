"""The device node: a driver around :class:`~emo_mqtt.strategies.device.DeviceStrategy`.

FL (``fl``, ``emo``, ``emo_all``): when the server's round announcement samples this
device, it loads the global model, trains locally (in the compute pool) and publishes its
update. Under EMO an :class:`~emo_mqtt.strategies.device.ActivationCapture` keeps, from the
very forward passes of that training, the activations the controller allows, in a bounded
outbox, published to the overlay after the update: FL never waits for an overlay and
nothing comes back.

SplitFed (``sfl``, ``sfl_v1``): the device holds only the trunk; for every batch it sends
the activations up and waits for their gradient before its backward pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.bus import Bus
from emo_mqtt.cache import ActivationBatch, DeviceOutbox
from emo_mqtt.codec import Envelope
from emo_mqtt.config import RunConfig
from emo_mqtt.controller import ControlDecision
from emo_mqtt.data import Split
from emo_mqtt.errors import EmoError
from emo_mqtt.messages import Control, Done, RoundAnnouncement, SflGradients, Update
from emo_mqtt.models import FLModel, build_fl_model, load_numpy_state
from emo_mqtt.nodes.base import Node, wait_event
from emo_mqtt.nodes.compute import compute
from emo_mqtt.nodes.limits import limits_for
from emo_mqtt.strategies.device import (
    ActivationCapture,
    DeviceStrategy,
    RoundAction,
    SplitClient,
    activations_message,
    capture_start,
    outbox_bound,
)
from emo_mqtt.topics import Kind, ParsedTopic, topic
from emo_mqtt.training import make_generator, make_rng, train_local

log = logging.getLogger("emo_mqtt.nodes.device")

P = ParamSpec("P")
R = TypeVar("R")


class DeviceNode(Node):
    """One IoT device of the fleet."""

    role = "device"

    def __init__(
        self,
        bus: Bus,
        config: RunConfig,
        run: str,
        node_id: str,
        algorithm: str,
        data: Split,
    ) -> None:
        super().__init__(bus, config, run, node_id)
        #: Training speed relative to this machine: slower devices wait out the difference.
        self.compute_speed = config.compute_speed(node_id)
        #: Seconds spent computing, and seconds waited to emulate a slower device.
        self.compute_busy_s = 0.0
        self.compute_wait_s = 0.0
        self.algorithm = Algorithm.parse(algorithm)
        self.data = data
        self.strategy = DeviceStrategy(config, self.algorithm, node_id)
        self.limits = limits_for(config, self.algorithm)
        # The model of the round being trained. Each round trains a fresh instance: a round
        # overtaken by the next one may still be running in its worker thread (threads cannot
        # be cancelled), and must not share weights or an outbox with its successor. Built
        # when first needed: in a fleet of thousands, most devices are never sampled, and
        # each one's idle model would cost memory and start-up time (issue 12).
        self._model: FLModel | None = None
        self.overlay = config.overlay_of(node_id)
        self._decision_event = asyncio.Event()
        self.outbox: DeviceOutbox[ActivationBatch] = self._new_outbox()
        self.outbox_evicted = 0
        self._training: asyncio.Task[None] | None = None
        #: Activations go up one round at a time, beside the rounds (see _queue_activations):
        #: the round whose activations wait for the link, and the task sending them.
        self._pending_activations: tuple[int, ActivationCapture] | None = None
        self._activation_sender: asyncio.Task[None] | None = None
        #: Rounds of activations dropped unsent because the uplink had not caught up.
        self.activation_rounds_dropped = 0
        #: Samples whose activations were captured, published, evicted from the outbox, or
        #: dropped unsent with their round; and repeats of a sample within one published
        #: round (0 by construction: capture runs in the last local epoch only).
        self.activations_captured = 0
        self.activations_published = 0
        self.activations_evicted = 0
        self.activations_dropped = 0
        self.activations_duplicates = 0
        self._gradients: dict[tuple[int, int], asyncio.Future[torch.Tensor]] = {}
        self.activation_bytes = 0
        self.rounds_trained = 0
        self.last_loss = math.nan  # mean local training loss of the last round trained
        self.on(
            Kind.SERVER_ROUND,
            lambda body, _: RoundAnnouncement.from_body(body, limits=self.limits),
            self._on_round,
        )
        self.on(
            Kind.SERVER_DONE,
            lambda body, _: Done.from_body(body, limits=self.limits),
            self._on_done,
        )
        self.on(
            Kind.CONTROL,
            lambda body, _: Control.from_body(body, limits=self.limits),
            self._on_control,
        )
        self.on(
            Kind.SERVER_SFL_GRADIENTS,
            lambda body, _: SflGradients.from_body(body, limits=self.limits),
            self._on_gradient,
        )

    @property
    def model(self) -> FLModel:
        """The model of the round being trained (a fresh one until the first round)."""
        if self._model is None:
            self._model = build_fl_model(self.config.fl.model)
        return self._model

    @model.setter
    def model(self, model: FLModel) -> None:
        self._model = model

    @property
    def decision(self) -> ControlDecision:
        return self.strategy.decision

    async def subscriptions(self) -> list[str]:
        subs = [topic(Kind.SERVER_ROUND, self.run), topic(Kind.SERVER_DONE, self.run)]
        if self.algorithm.uses_overlays:
            subs.append(topic(Kind.CONTROL, self.run, node=self.node_id))
        if self.algorithm.is_split:
            subs.append(topic(Kind.SERVER_SFL_GRADIENTS, self.run, node=self.node_id))
        return subs

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        out.update(
            algorithm=self.algorithm.value,
            rounds_trained=self.rounds_trained,
            loss=self.last_loss,
            activation_bytes=self.activation_bytes,
            outbox_bytes=self.outbox.bytes,
            outbox_evicted=self.outbox_evicted + self.outbox.stats.evicted,
            decision=self.strategy.decision.to_dict(),
            decision_round=self.strategy.decision_round,
            activation_rounds_dropped=self.activation_rounds_dropped,
            activations_captured=self.activations_captured,
            activations_published=self.activations_published,
            activations_evicted=self.activations_evicted,
            activations_dropped=self.activations_dropped,
            activations_duplicates=self.activations_duplicates,
            compute_speed=self.compute_speed,
            compute_busy_s=round(self.compute_busy_s, 3),
            compute_wait_s=round(self.compute_wait_s, 3),
        )
        return out

    # -- handlers ---------------------------------------------------------------------------
    async def _on_round(self, where: ParsedTopic, env: Envelope, msg: RoundAnnouncement) -> None:
        action = self.strategy.on_round(msg)
        self.round = self.strategy.round
        if action is RoundAction.RESEND and self.strategy.last_update is not None:
            self.spawn(
                self.send(
                    Kind.DEVICE_UPDATE,
                    self.strategy.last_update.to_body(),
                    msg_kind="update",
                    node=self.node_id,
                )
            )
            return
        if action is not RoundAction.TRAIN:
            return
        if self._training is not None and not self._training.done():
            # A new round started before we finished: the server has closed the old one.
            self._training.cancel()
        self._training = asyncio.create_task(self._train_round(msg.round, msg.weights))

    def on_new_incarnation(self, incarnation: str) -> None:
        # Another start of the server: its rounds count from wherever it starts (1 for a new
        # run, the checkpoint's round for a restart); what we trained for the old one is not
        # sent again but trained again (the same seeds: the same update).
        self.strategy.round = 0
        self.strategy.last_update = None
        if self._training is not None and not self._training.done():
            self._training.cancel()

    async def _on_done(self, where: ParsedTopic, env: Envelope, msg: Done) -> None:
        log.info("device %s: done (round %d, %s)", self.node_id, msg.round, msg.reason)
        self.stop()

    async def _on_control(self, where: ParsedTopic, env: Envelope, msg: Control) -> None:
        if self.strategy.on_control(msg):
            self._decision_event.set()

    async def _on_gradient(self, where: ParsedTopic, env: Envelope, msg: SflGradients) -> None:
        key = (msg.round, msg.batch)
        future = self._gradients.get(key)
        if future is None or future.done():
            self.bus.reject(
                "stale_gradient",
                topic(Kind.SERVER_SFL_GRADIENTS, self.run, node=self.node_id),
                f"no batch {key}",
            )
            return
        future.set_result(torch.as_tensor(np.asarray(msg.gradient)))

    async def main(self) -> None:
        await self.stopping.wait()
        if self._training is not None and not self._training.done():
            self._training.cancel()
        if self._activation_sender is not None:  # the run is over: no overlay trains any more
            self._activation_sender.cancel()

    def _queue_activations(self, r: int, capture: ActivationCapture) -> None:
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
            dropped = self._pending_activations[1]
            held = sum(len(b) for b in dropped.outbox.pop_all())
            self.activations_evicted += dropped.captured - held
            self.activations_dropped += held
        self._pending_activations = (r, capture)
        if self._activation_sender is None or self._activation_sender.done():
            self._activation_sender = asyncio.create_task(self._send_activations())

    async def _send_activations(self) -> None:
        while self._pending_activations is not None:
            r, capture = self._pending_activations
            self._pending_activations = None
            try:
                await self._flush_outbox(r, capture)
            except EmoError as exc:  # a publish timed out or the bus closed: try the next
                log.warning(
                    "device %s: round %d activations not published: %s", self.node_id, r, exc
                )

    # -- training ---------------------------------------------------------------------------
    async def _train_round(self, r: int, weights: dict[str, np.ndarray]) -> None:
        try:
            if self.algorithm.is_split:
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
        deadline = asyncio.get_running_loop().time() + 2.0
        while True:
            decision = self.strategy.decision_for(r)
            if decision is not None or asyncio.get_running_loop().time() >= deadline:
                return decision or self.strategy.decision
            await wait_event(self._decision_event, 0.2)

    async def _emulate_speed(self, busy_s: float) -> None:
        """After ``busy_s`` seconds of computing, wait as long as a slower device would have."""
        self.compute_busy_s += busy_s
        if self.compute_speed < 1:
            wait = busy_s * (1 / self.compute_speed - 1)
            self.compute_wait_s += wait
            await asyncio.sleep(wait)

    def _new_outbox(self) -> DeviceOutbox[ActivationBatch]:
        shape = tuple(self.model.activation_shape)
        return DeviceOutbox(outbox_bound(self.config, self.algorithm, len(self.data), shape))

    async def _fl_round(self, r: int, weights: dict[str, np.ndarray]) -> None:
        model = build_fl_model(self.config.fl.model)
        load_numpy_state(model, weights)
        self.model = model
        self.outbox_evicted += self.outbox.stats.evicted
        outbox = self.outbox = self._new_outbox()
        c = self.config
        capture = None
        if self.algorithm.uses_overlays:
            decision = await self._current_decision(r)
            # Its own stream: what is published never touches the training RNG.
            capture = ActivationCapture(
                r,
                decision,
                make_rng(c.run.seed, "activations", self.node_id, r),
                outbox,
                first_step=capture_start(len(self.data), c.fl.batch_size, c.fl.local_epochs),
            )
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
        update = self._stamped(self.strategy.update(r, model, report.samples, report.loss))
        await self.send(Kind.DEVICE_UPDATE, update.to_body(), msg_kind="update", node=self.node_id)
        log.info(
            "device %s: round %d trained, update sent (loss %.4f)", self.node_id, r, report.loss
        )
        if capture is not None:
            self.activations_captured += capture.captured
            self._queue_activations(r, capture)

    def _stamped(self, update: Update) -> Update:
        """``update`` marked with the server start whose round it answers (kept for resends)."""
        stamped = replace(update, incarnation=self.incarnations.current or "")
        self.strategy.last_update = stamped
        return stamped

    async def _flush_outbox(self, r: int, capture: ActivationCapture) -> None:
        """Publish this round's activations in one message (chunked by the bus if large)."""
        msg = activations_message(r, capture.outbox.pop_all(), tuple(self.model.activation_shape))
        sent = len(msg.sample_ids)
        self.activations_evicted += capture.captured - sent
        self.activations_duplicates += sent - len(np.unique(msg.sample_ids))
        self.activation_bytes += int(
            msg.data.nbytes
            + msg.sample_ids.nbytes
            + msg.labels.nbytes
            + (0 if msg.scale is None else msg.scale.nbytes)
        )
        # In the background: on a slow uplink, the next round's FL update must not queue
        # behind megabytes of activations (FL never waits for the overlays).
        try:
            await self.send(
                Kind.DEVICE_ACTIVATIONS,
                msg.to_body(),
                msg_kind=msg.KIND,
                node=self.node_id,
                background=True,
            )
        except EmoError:
            self.activations_dropped += sent  # never went up: counted, then logged above
            raise
        self.activations_published += sent

    async def _sfl_round(self, r: int, weights: dict[str, np.ndarray]) -> None:
        client = SplitClient(self.config, self.data, r, weights, self.node_id)
        self.model = client.model
        loop = asyncio.get_running_loop()
        for batch, idx in enumerate(client.batches()):
            began = time.perf_counter()
            msg = client.forward(batch, idx)
            await self._emulate_speed(time.perf_counter() - began)
            future: asyncio.Future[torch.Tensor] = loop.create_future()
            self._gradients[(r, batch)] = future
            await self.send(
                Kind.DEVICE_SFL_ACTIVATIONS, msg.to_body(), msg_kind=msg.KIND, node=self.node_id
            )
            try:
                grad = await asyncio.wait_for(future, self.config.sfl.gradient_timeout_s)
            except TimeoutError:
                raise EmoError(f"no gradient for round {r} batch {batch}") from None
            finally:
                self._gradients.pop((r, batch), None)
            began = time.perf_counter()
            try:
                client.backward(grad)
            except EmoError as exc:  # a gradient of another shape than the batch's
                raise EmoError(f"round {r} batch {batch}: {exc}") from exc
            await self._emulate_speed(time.perf_counter() - began)
        trunk, samples, loss = client.update()
        update = self._stamped(self.strategy.update(r, trunk, samples, loss))
        await self.send(Kind.DEVICE_UPDATE, update.to_body(), msg_kind="update", node=self.node_id)


def _timed(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[R, float]:
    """``fn``'s result and the seconds it took (run in the compute pool: queueing excluded)."""
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - began
