"""The device side, sans I/O: the FL client, the SplitFed client, and EMO's capture add-on.

:class:`DeviceStrategy` decides what a round announcement means for this device (train,
send the last update again to a restarted server, or nothing), keeps the controller's
latest decision and builds the update. Training itself is a function the driver runs in
its compute pool (:func:`emo_mqtt.training.train_local`); under EMO it is given an
:class:`ActivationCapture` as its activation callback: capture is an add-on that never
touches the training RNG, so FL is bit-identical with or without it. The SplitFed client
(:class:`SplitClient`) runs batch by batch around the gradient the server sends back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.cache import ActivationBatch, DeviceOutbox
from emo_mqtt.config import RunConfig
from emo_mqtt.controller import ControlDecision, select_for_publish
from emo_mqtt.data import Split
from emo_mqtt.errors import TrainingDiverged
from emo_mqtt.messages import Activations, Control, RoundAnnouncement, SflActivations, Update
from emo_mqtt.models import FLModel, build_fl_model, load_numpy_state, state_to_numpy
from emo_mqtt.training import make_generator, sfl_device_backward

__all__ = [
    "ActivationCapture",
    "DeviceStrategy",
    "RoundAction",
    "SplitClient",
    "activations_message",
    "capture_start",
    "outbox_bound",
]


class RoundAction(Enum):
    """What a round announcement asks of this device."""

    IGNORE = "ignore"
    #: The same round announced anew (a restarted server): send the last update again.
    RESEND = "resend"
    TRAIN = "train"


class DeviceStrategy:
    """A device's state between rounds: the round, the controller's decision, the last update."""

    def __init__(self, config: RunConfig, algorithm: Algorithm, node_id: str) -> None:
        self.config = config
        self.algorithm = algorithm
        self.node_id = node_id
        self.round = 0
        # Before the first control message: the controller's warm-up rate.
        policy = config.controller.policy()
        self.decision = ControlDecision(policy.max_fraction, policy.warmup_precision, 1, "initial")
        self.decision_round = 0
        #: The last update sent: sent again when a restarted server announces its round anew.
        self.last_update: Update | None = None

    def on_round(self, msg: RoundAnnouncement) -> RoundAction:
        if (
            msg.round == self.round
            and self.last_update is not None
            and self.last_update.round == msg.round
        ):
            # The same round announced by a new envelope (exact redeliveries are dropped as
            # duplicates before any handler): a server that restarted from its checkpoint
            # and may have lost our update with its old session. A server that has it
            # already counts it as a duplicate, never twice.
            return RoundAction.RESEND
        if msg.round <= self.round:
            return RoundAction.IGNORE  # a retained announcement we already handled
        self.round = msg.round
        return RoundAction.TRAIN if self.node_id in msg.sampled else RoundAction.IGNORE

    def on_control(self, msg: Control) -> bool:
        """Take a decision unless an older one; whether it was taken."""
        if msg.round >= self.decision_round:
            self.decision = msg.decision
            self.decision_round = msg.round
            return True
        return False

    def decision_for(self, r: int) -> ControlDecision | None:
        """The decision that applies to round ``r``; None while it may still come."""
        if self.algorithm.sends_everything:
            return ControlDecision(1.0, "fp32", 1, "send-everything")
        return self.decision if self.decision_round >= r else None

    def update(self, r: int, model: torch.nn.Module, samples: int, loss: float) -> Update:
        self.last_update = Update(r, state_to_numpy(model), samples, loss)
        return self.last_update


def capture_start(samples: int, batch_size: int, epochs: int) -> int:
    """Training steps before the last local epoch: capture skips them.

    Each epoch visits every sample once, so capturing in one epoch only sends each sample's
    activations at most once a round; the last epoch's are the freshest (the trunk closest
    to the update the device sends).
    """
    return math.ceil(samples / batch_size) * max(epochs - 1, 0)


def outbox_bound(
    config: RunConfig, algorithm: Algorithm, samples: int, activation_shape: tuple[int, ...]
) -> int:
    """The device outbox's bound in bytes: ``emo.outbox_kib``, except for the references.

    ``emo_all`` is the reference "every activation, fp32": its outbox holds a whole round's
    capture (every sample once: fp32 activations, int64 id and label), so that nothing is
    evicted and the label is true as measured; so does ``emo`` with the controller off
    (``controller.enabled = false``: every activation, fp32, too). The fixed rules
    (``emo_int8``, ``emo_fixed``) likewise hold a whole round at their own share and
    precision, so that an ablation is the rule it names and not the rule minus evictions.
    An IoT device with less memory cannot run them; the controlled ``emo`` keeps the
    configured bound.
    """
    bound = config.emo.outbox_kib * 1024
    elements = math.prod(activation_shape)
    if algorithm.sends_everything or (
        algorithm.uses_overlays and not algorithm.fixed_rule and not config.controller.enabled
    ):
        bound = max(bound, samples * (elements * 4 + 2 * 8))
    elif algorithm.fixed_rule:
        int8 = algorithm is Algorithm.EMO_INT8
        precision = "int8" if int8 else config.controller.fixed_precision
        share = 1.0 if int8 else config.controller.fixed_share
        width = {"fp32": 4, "fp16": 2, "int8": 1}[precision]
        # int8 batches also carry a float scale per sample; 8 bytes covers it.
        per_sample = elements * width + 2 * 8 + (8 if precision == "int8" else 0)
        bound = max(bound, math.ceil(samples * share) * per_sample)
    return bound


class ActivationCapture:
    """EMO's add-on to local training: keeps the activations the decision allows.

    Called by :func:`~emo_mqtt.training.train_local` after each step; draws only from its
    own RNG stream (``make_rng(seed, "activations", device, round)``). The first
    ``first_step`` steps (the epochs before the last: :func:`capture_start`) are skipped,
    so a sample's activations travel at most once a round. ``captured`` counts the samples
    pushed to the outbox.
    """

    def __init__(
        self,
        r: int,
        decision: ControlDecision,
        rng: np.random.Generator,
        outbox: DeviceOutbox[ActivationBatch],
        first_step: int = 0,
    ) -> None:
        self.round = r
        self.decision = decision
        self.rng = rng
        self.outbox = outbox
        self.first_step = first_step
        self.steps = 0
        self.batch_index = 0
        self.captured = 0

    def __call__(self, idx: np.ndarray, acts: torch.Tensor, labels: np.ndarray) -> None:
        self.steps += 1
        if self.steps <= self.first_step:
            return
        chosen = select_for_publish(self.decision, self.batch_index, len(idx), self.rng)
        self.batch_index += 1
        if chosen.size:
            self.captured += int(chosen.size)
            self.outbox.push(
                ActivationBatch.quantize(
                    self.round,
                    idx[chosen],
                    acts.numpy()[chosen],
                    labels[chosen],
                    self.decision.precision,
                )
            )


def activations_message(
    r: int, batches: list[ActivationBatch], activation_shape: tuple[int, ...]
) -> Activations:
    """One round's captured batches as one message."""
    if batches:
        ids = np.concatenate([b.sample_ids for b in batches])
        labels = np.concatenate([b.labels for b in batches])
        data = np.concatenate([b.data for b in batches])
        scales = [b.scale for b in batches if b.scale is not None]
        scale = np.concatenate(scales) if len(scales) == len(batches) else None
    else:
        ids = np.zeros(0, dtype=np.int64)
        labels = np.zeros(0, dtype=np.int64)
        data = np.zeros((0, *activation_shape), dtype=np.float32)
        scale = None
    return Activations(r, ids, labels, data, scale, True)


@dataclass
class SplitClient:
    """SplitFed's device half for one round: batches in the training order, one at a time.

    The driver calls :meth:`forward` (the activations to send), waits for the gradient, and
    calls :meth:`backward`; :meth:`update` is the round's update.
    """

    config: RunConfig
    data: Split
    round: int
    weights: dict[str, np.ndarray]
    node_id: str

    def __post_init__(self) -> None:
        self.model: FLModel = build_fl_model(self.config.fl.model)
        self.trunk = self.model.trunk
        load_numpy_state(self.trunk, self.weights)
        self.optimizer = torch.optim.SGD(self.trunk.parameters(), lr=self.config.sfl.lr)
        self._x = torch.tensor(np.asarray(self.data.x))
        self._y = torch.tensor(np.asarray(self.data.y))
        self._out: torch.Tensor | None = None
        self.trunk.train()

    def batches(self) -> list[torch.Tensor]:
        """The index batches of the round, epoch after epoch (the device's own RNG)."""
        c = self.config
        generator = make_generator(c.run.seed, "train", self.node_id, self.round)
        n = len(self.data)
        out: list[torch.Tensor] = []
        for _ in range(c.fl.local_epochs):
            order = torch.randperm(n, generator=generator)
            out.extend(
                order[start : start + c.fl.batch_size] for start in range(0, n, c.fl.batch_size)
            )
        return out

    def forward(self, batch: int, idx: torch.Tensor) -> SflActivations:
        """The batch's cut-layer activations to send up.

        Raises :class:`TrainingDiverged` when the trunk's output is non-finite (its weights
        blew up at too high an ``sfl.lr``): the server would refuse the batch, and the
        device would wait out its gradient timeout for nothing.
        """
        out = self.trunk(self._x[idx])
        if not bool(torch.isfinite(out).all()):
            raise TrainingDiverged(
                f"SplitFed diverged: {self.node_id}'s trunk gave non-finite activations at "
                f"round {self.round}, batch {batch}; lower sfl.lr"
            )
        self._out = out
        return SflActivations(self.round, batch, out.detach(), self._y[idx])

    def backward(self, grad: torch.Tensor) -> None:
        assert self._out is not None
        sfl_device_backward(self._out, grad, self.optimizer)
        self._out = None

    def update(self) -> tuple[torch.nn.Module, int, float]:
        return self.trunk, len(self.data) * self.config.fl.local_epochs, math.nan
