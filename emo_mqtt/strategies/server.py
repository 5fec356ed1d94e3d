"""The server side of every algorithm, sans I/O: FedAvg, SplitFed V1/V2 and EMO.

Composition rather than flags: :class:`ServerStrategy` is FedAvg (sampling, collection with
a straggler policy, averaging). SplitFed adds a :class:`SplitServer` (the server-side half
of the model), whose :class:`HeadPolicy` is the only difference between V1 (a head per
device, averaged) and V2 (one shared head, updated in turn). EMO adds an
:class:`OverlayPool` (the overlays' latest models, for the ensemble) and a controller whose
decisions go out before each round (:class:`~emo_mqtt.controller.SendEverything` for
``emo_all``).

The driver (:class:`emo_mqtt.nodes.server.ServerNode`) calls, per round:
:meth:`~ServerStrategy.start_round` (publish what it returns), :meth:`~ServerStrategy.on_update`
and friends as messages arrive, :meth:`~ServerStrategy.ready` / :meth:`~ServerStrategy.failed`
with the time, :meth:`~ServerStrategy.close_round`, then :func:`evaluate` in a worker thread,
and :meth:`~ServerStrategy.record_round`. Torch work that is cheap (a SplitFed head step,
drift on 256 probes) runs inside the strategy; evaluation, the costly part, is a pure
function the driver runs in its compute pool.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.config import RunConfig
from emo_mqtt.controller import (
    Controller,
    ConvergenceController,
    FixedRule,
    SendEverything,
    activation_drift,
)
from emo_mqtt.data import Split
from emo_mqtt.dataplan import DataPlan
from emo_mqtt.ensemble import Ensemble
from emo_mqtt.errors import TrainingDiverged
from emo_mqtt.fedavg import (
    NormReference,
    RoundCollector,
    RoundResult,
    aggregate,
    sample_clients,
)
from emo_mqtt.messages import (
    Control,
    Done,
    MessageError,
    OverlayModelMsg,
    RoundAnnouncement,
    SflActivations,
    SflGradients,
    Update,
)
from emo_mqtt.models import (
    FLModel,
    OverlayModel,
    build_fl_model,
    build_overlay_model,
    build_split_model,
    load_numpy_state,
    state_to_numpy,
)
from emo_mqtt.strategies.base import Outgoing, RoundState
from emo_mqtt.topics import Kind
from emo_mqtt.training import evaluate as evaluate_model
from emo_mqtt.training import seed_everything, sfl_server_step

__all__ = [
    "ClosedRound",
    "HeadPerDevice",
    "HeadPolicy",
    "OverlayPool",
    "ServerStrategy",
    "SharedHead",
    "SplitServer",
    "calibrated_accuracy",
    "evaluate",
    "model_digest",
]


def model_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over a state dict's names and bytes: equal digests, bit-identical models."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ SplitFed


class HeadPolicy(Protocol):
    """How SplitFed's server keeps its head(s): the one difference between V1 and V2."""

    def keys(self, sampled: list[str]) -> list[str]:
        """The heads a round needs."""
        ...

    def key_for(self, device: str) -> str:
        """The head that serves ``device``'s batches."""
        ...

    def merge(
        self, heads: dict[str, torch.nn.Module], contributors: dict[str, int]
    ) -> dict[str, np.ndarray] | None:
        """The head state the global model takes at the end of the round (None: keep)."""
        ...


class SharedHead:
    """SplitFed V2: one head shared by every device, updated batch after batch."""

    def keys(self, sampled: list[str]) -> list[str]:
        del sampled
        return ["shared"]

    def key_for(self, device: str) -> str:
        del device
        return "shared"

    def merge(
        self, heads: dict[str, torch.nn.Module], contributors: dict[str, int]
    ) -> dict[str, np.ndarray] | None:
        del contributors
        return state_to_numpy(heads["shared"])


@dataclass(frozen=True)
class HeadPerDevice:
    """SplitFed V1: a head copy per device, aggregated over the round's contributors.

    With the scenario's aggregator (``fleet.aggregator``, FedAvg weighted by the capped
    sample counts by default), as the device-side updates are: under ``median`` or
    ``trimmed_mean`` one device's batches cannot drag the merged head further than they
    can drag the trunk.
    """

    aggregator: str = "fedavg"
    trim_fraction: float = 0.1

    def keys(self, sampled: list[str]) -> list[str]:
        return list(sampled)

    def key_for(self, device: str) -> str:
        return device

    def merge(
        self, heads: dict[str, torch.nn.Module], contributors: dict[str, int]
    ) -> dict[str, np.ndarray] | None:
        updates = [(d, state_to_numpy(heads[d]), n) for d, n in contributors.items()]
        if not updates:
            return None
        return aggregate(updates, self.aggregator, trim_fraction=self.trim_fraction)


@dataclass
class SplitServer:
    """SplitFed's server half: the head(s) of the round and their optimisers.

    The "head" is the server half of the split model (:func:`build_split_model`: the
    scenario's overlay model on the trunk's cut layer), trained with ``sfl.server_optimizer``
    at ``sfl.server_lr`` (``sfl.lr`` when 0). Optimiser state lives for one round, as the
    device half's does.
    """

    config: RunConfig
    policy: HeadPolicy
    #: Validation images: what the round's trunk makes of them is a batch a sound device
    #: would send, so a head that gives non-finite outputs on it has diverged.
    probe: torch.Tensor
    heads: dict[str, torch.nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    #: Server-side loss of every batch of the run, in arrival order.
    losses: list[float] = field(default_factory=list)
    #: The round's global trunk (set by :meth:`start`; unchanged until the round closes).
    trunk: torch.nn.Module = field(init=False)

    def start(self, model: FLModel, sampled: list[str]) -> None:
        self.trunk = model.trunk
        self.heads.clear()
        self.optimizers.clear()
        for key in self.policy.keys(sampled):
            head = copy.deepcopy(model.head)
            self.heads[key] = head
            self.optimizers[key] = self._optimizer(head)

    def _optimizer(self, head: torch.nn.Module) -> torch.optim.Optimizer:
        c = self.config.sfl
        lr = c.server_lr or c.lr
        if c.server_optimizer == "adam":
            return torch.optim.Adam(head.parameters(), lr=lr)
        return torch.optim.SGD(head.parameters(), lr=lr)

    def step(self, device: str, msg: SflActivations) -> torch.Tensor:
        """One batch: forward, backward and step of the device's head; the gradient.

        A batch whose loss or gradient is not finite leaves the head as it was
        (:func:`sfl_server_step` does not step) and raises: :class:`MessageError`
        (``non_finite``) when the head is sound on the probe, so the batch was at fault (a
        device sending huge finite values cannot stop the run); :class:`TrainingDiverged`
        when the head itself gives non-finite outputs (the run's lr is too high). Devices
        refuse non-finite gradients, so sending one would only stall them.
        """
        key = self.policy.key_for(device)
        head = self.heads[key]
        acts = torch.as_tensor(np.asarray(msg.activations))
        labels = torch.as_tensor(np.asarray(msg.labels))
        loss, grad = sfl_server_step(head, self.optimizers[key], acts, labels)
        if math.isfinite(loss) and bool(torch.isfinite(grad).all()):
            self.losses.append(loss)
            return grad
        what = "loss" if not math.isfinite(loss) else "gradient"
        with torch.no_grad():
            sound = bool(torch.isfinite(head(self.trunk(self.probe))).all())
        if sound:
            raise MessageError(
                "non_finite",
                f"batch {msg.batch} of round {msg.round} gives a non-finite {what} on a "
                "sound server half",
            )
        raise TrainingDiverged(
            f"SplitFed diverged: the server half for {device} gives non-finite outputs on "
            f"validation images and gave a non-finite {what} at round {msg.round}, batch "
            f"{msg.batch}; lower sfl.lr (or sfl.server_lr)"
        )

    def finish(self, model: FLModel, contributors: dict[str, int]) -> None:
        state = self.policy.merge(self.heads, contributors)
        if state is not None:
            load_numpy_state(model.head, state)


# ------------------------------------------------------------------------------ overlays


@dataclass
class OverlayPool:
    """EMO: the latest model of each overlay, and the overlays flagged as poisoned."""

    config: RunConfig
    activation_shape: tuple[int, ...]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Overlay id -> times a model of it was refused as poisoned (non-finite weights, loss
    #: or validation outputs). A poisoned overlay leaves the ensemble until a sound model
    #: of it arrives.
    poisoned: dict[str, int] = field(default_factory=dict)
    #: Overlay id -> the last round in which a device it replays was sampled (this server's
    #: incarnation only): an overlay none of whose devices was sampled within the staleness
    #: window has nothing to train on, and publishes no model for the last round.
    served: dict[str, int] = field(default_factory=dict)

    def accept(self, overlay: str, msg: OverlayModelMsg) -> None:
        model = build_overlay_model(self.config.emo.overlay_model, self.activation_shape)
        # fp16 on the wire, decoded back to float32; integer buffers (batch norm) as sent.
        load_numpy_state(model, msg.weights)
        self.models[overlay] = {
            "model": model,
            "round": msg.round,
            "version": msg.version,
            "loss": msg.loss,
        }

    def poison(self, overlay: str) -> None:
        self.poisoned[overlay] = self.poisoned.get(overlay, 0) + 1
        self.models.pop(overlay, None)

    def rounds(self) -> dict[str, int]:
        return {k: int(v["round"]) for k, v in sorted(self.models.items())}

    def snapshot(self, model: FLModel) -> Ensemble | None:
        if not self.models:
            return None
        overlays: dict[str, OverlayModel] = {k: v["model"] for k, v in sorted(self.models.items())}
        return Ensemble(model, overlays, scaling=self.config.emo.scaling)

    def serve(self, r: int, sampled: list[str]) -> None:
        """Round ``r`` sampled ``sampled``: the overlays replaying them will have work."""
        if not sampled:
            return
        if self.config.emo.replay_scope == "fleet":
            overlays = set(self.config.overlay_ids())
        else:
            overlays = {self.config.overlay_of(d) for d in sampled}
        for overlay in overlays:
            self.served[overlay] = r

    def awaited(self, r: int) -> set[str]:
        """The overlays whose model of round ``r`` the final evaluation waits for.

        Those served within the replay window (``emo.max_staleness`` rounds): one whose
        devices were not sampled in it has nothing left to replay and sends no model, and
        waiting for it would hold every run with sparse sampling (1,000 devices, 5 % a
        round, 10 overlays) for a whole round deadline. A server that served nothing yet
        in this incarnation (resumed from a checkpoint) waits for all of them, as before.
        """
        if not self.served:
            return set(self.config.overlay_ids())
        window = r - self.config.emo.max_staleness
        return {o for o, last in self.served.items() if last >= window}

    def up_to_date(self, r: int) -> bool:
        current = {k for k, v in self.models.items() if v["round"] >= r}
        return self.awaited(r) <= current


# ------------------------------------------------------------------------------ the server


@dataclass(frozen=True)
class ClosedRound:
    """A round as it closed, before its evaluation."""

    round: int
    sampled: list[str]
    received: list[str]
    contributors: dict[str, int]
    aggregated: bool
    overlay_rounds: dict[str, int]


def control_policy(config: RunConfig, algorithm: Algorithm) -> Controller:
    """What sets the devices' activation traffic under ``algorithm``: the convergence
    controller (``emo``, when enabled), a fixed rule with no signal (the ablations
    ``emo_int8`` and ``emo_fixed``), or every activation at fp32 (``emo_all``, and ``emo``
    with the controller off)."""
    if algorithm is Algorithm.EMO_INT8:
        return FixedRule(1.0, "int8", "fixed: every sample, int8")
    if algorithm is Algorithm.EMO_FIXED:
        c = config.controller
        return FixedRule(
            c.fixed_share, c.fixed_precision, f"fixed: {c.fixed_share:g} at {c.fixed_precision}"
        )
    if algorithm.controlled and config.controller.enabled:
        controller = ConvergenceController(config.controller.policy())
        for device in config.device_ids():
            controller.assign(device, config.overlay_of(device))
        return controller
    return SendEverything()


class ServerStrategy:
    """FedAvg rounds, plus the SplitFed server half or EMO's overlays and controller."""

    def __init__(self, config: RunConfig, algorithm: Algorithm, plan: DataPlan) -> None:
        self.config = config
        self.algorithm = algorithm
        self.plan = plan
        seed_everything(config.run.seed)
        # SplitFed trains the large model (trunk + the overlay model as server half); the
        # trunk's initial weights are the FL model's for the same seed either way.
        self.model = (
            build_split_model(config.fl.model, config.emo.overlay_model)
            if algorithm.is_split
            else build_fl_model(config.fl.model)
        )
        self.state = RoundState.IDLE
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []
        self.rejected_updates = 0
        #: Mean training loss the devices reported with their updates in the last closed
        #: round (FedAvg); SplitFed: mean server-side loss of the round's batches.
        self.last_loss = math.nan
        self.collector: RoundCollector | None = None
        self.controller: Controller = control_policy(config, algorithm)
        #: Validation images: the controller's drift probe, and SplitFed's check of a head.
        self.probe = torch.tensor(plan.validation.x[: config.controller.probe_samples])
        self.split: SplitServer | None = None
        if algorithm.is_split:
            policy: HeadPolicy = (
                HeadPerDevice(config.fleet.aggregator, config.fleet.trim_fraction)
                if algorithm.head_per_device
                else SharedHead()
            )
            self.split = SplitServer(config, policy, self.probe)
        self.overlays: OverlayPool | None = None
        if algorithm.uses_overlays:
            self.overlays = OverlayPool(config, tuple(self.model.activation_shape))
        self.prev_probe: np.ndarray | None = None
        self._sampled: list[str] = []
        self._samples: dict[str, int] = {}
        self._losses: list[float] = []
        self._split_batches = 0
        #: Against a poisoning device (issue 11): the most samples each device's update may
        #: weigh (its share of the data plan times the local epochs: exactly what an honest
        #: device reports, FedAvg and SplitFed alike, so honest runs are unchanged) ...
        self.max_samples = {
            d: len(plan.device(d)) * config.fl.local_epochs for d in config.device_ids()
        }
        #: ... and the norm the update bound is measured against: the median norm of the
        #: last global models (device side), which one zeroed round cannot zero. Seeded
        #: with the initial (or restored) model when round 1 (or the resumed round) opens.
        self.norm_reference = NormReference()

    # -- what travels ------------------------------------------------------------------------
    def device_side_state(self) -> dict[str, np.ndarray]:
        """What devices train: the whole FL model, or its trunk under SplitFed."""
        return state_to_numpy(self.model.trunk if self.split else self.model)

    def _load_device_side(self, state: dict[str, np.ndarray]) -> None:
        load_numpy_state(self.model.trunk if self.split else self.model, state)

    # -- a round -----------------------------------------------------------------------------
    def start_round(self, r: int, now: float) -> list[Outgoing]:
        """Open round ``r``: sample, decide, and announce. What to publish, in order."""
        c = self.config
        self.round = r
        sampled = sample_clients(c.device_ids(), c.fleet.sample_fraction, c.run.seed, r)
        self._sampled = sampled
        self._samples = {}
        self._losses = []
        out: list[Outgoing] = []
        if self.split is not None:
            self._split_batches = len(self.split.losses)
            self.split.start(self.model, sampled)
        if self.overlays is not None:
            self.overlays.serve(r, sampled)
            for device in sampled:
                decision = self.controller.decide(device, r)
                self.decisions.append({"round": r, "device": device, **decision.to_dict()})
                out.append(Outgoing(Kind.CONTROL, device, Control(r, decision), retain=True))
        reference = self.device_side_state()
        if self.norm_reference.value is None:
            self.norm_reference.observe(reference)
        self.collector = RoundCollector(
            round=r,
            expected=sampled,
            min_updates=min(c.fleet.min_updates, len(sampled)),
            deadline_s=c.fleet.round_deadline_s,
            started_at=now,
            reference=reference,
            # Bad input: an update farther than this from the global model is refused.
            max_norm_ratio=c.fleet.max_update_norm_ratio or None,
            max_samples=self.max_samples,
            norm_reference=self.norm_reference.value,
            aggregator=c.fleet.aggregator,
            trim_fraction=c.fleet.trim_fraction,
        )
        out.append(
            Outgoing(
                Kind.SERVER_ROUND,
                None,
                RoundAnnouncement(
                    r, self.algorithm.value, tuple(sampled), c.fleet.round_deadline_s, reference
                ),
                retain=True,
            )
        )
        self.state = RoundState.COLLECTING
        return out

    def on_update(
        self, device: str, sender: str, msg: Update, now: float
    ) -> tuple[str, str] | None:
        """Offer a device's update; None when accepted, else ``(reason, detail)``."""
        collector = self.collector
        if (
            self.state is not RoundState.COLLECTING
            or collector is None
            or msg.round != self.round
            or device != sender
        ):
            return "late_update", f"update for round {msg.round} outside round {self.round}"
        if not collector.add(device, msg.weights, msg.samples, now):
            reason = collector.rejected.pop(device, None)
            if reason is not None:
                # Non-finite, mis-shaped or otherwise invalid: never enters the average.
                self.rejected_updates += 1
                return "bad_update", reason
            return "duplicate_update", "not sampled this round, or already received"
        # Weighed as the collector weighs it: capped by the data plan.
        self._samples[device] = min(msg.samples, self.max_samples[device])
        if math.isfinite(msg.loss):
            self._losses.append(msg.loss)
        return None

    def on_sfl_activations(self, device: str, msg: SflActivations) -> list[Outgoing] | str:
        """A SplitFed batch: its gradient to send back, or why the batch was refused."""
        if (
            self.split is None
            or self.state is not RoundState.COLLECTING
            or msg.round != self.round
            or device not in self._sampled
        ):
            return f"round {msg.round} while at {self.round}"
        grad = self.split.step(device, msg)
        return [
            Outgoing(Kind.SERVER_SFL_GRADIENTS, device, SflGradients(msg.round, msg.batch, grad))
        ]

    def on_overlay_model(self, overlay: str, msg: OverlayModelMsg) -> str | None:
        """An overlay's new model (already checked finite); why it was refused, or None."""
        if self.overlays is None or overlay not in self.config.overlay_ids():
            return overlay
        held = self.overlays.models.get(overlay)
        if held is not None and msg.version < held["version"]:
            return f"{overlay}: version {msg.version} after {held['version']}"
        self.overlays.accept(overlay, msg)
        self.controller.observe_overlay(overlay, msg.round, msg.loss)
        return None

    def ready(self, now: float) -> bool:
        return self.collector is not None and self.collector.ready(now)

    def failed(self, now: float) -> bool:
        return self.collector is not None and self.collector.failed(now)

    def close_round(self, result: RoundResult | None) -> ClosedRound:
        """Close the round with ``result`` (None: closed unaggregated) and observe it."""
        collector = self.collector
        assert collector is not None and self.state is RoundState.COLLECTING
        received = collector.received
        self.collector = None
        round_losses = (
            self.split.losses[self._split_batches :] if self.split is not None else self._losses
        )
        if round_losses:
            self.last_loss = float(np.mean(round_losses))
        contributors: dict[str, int] = {}
        if result is not None:
            self._load_device_side(result.state)
            # Only an aggregated round moves the reference (a closed-empty one repeats it).
            self.norm_reference.observe(result.state)
            contributors = {d: self._samples[d] for d in result.contributors}
        if self.split is not None:
            self.split.finish(self.model, contributors)
        if self.overlays is not None:
            with torch.no_grad():
                self.model.trunk.eval()
                cur = self.model.trunk(self.probe).numpy()
            drift = None if self.prev_probe is None else activation_drift(self.prev_probe, cur)
            self.prev_probe = cur
            mean_loss = float(np.mean(self._losses)) if self._losses else None
            self.controller.observe_round(self.round, drift, mean_loss)
        self.state = RoundState.CLOSED
        return ClosedRound(
            self.round,
            list(self._sampled),
            received,
            contributors,
            result is not None,
            {} if self.overlays is None else self.overlays.rounds(),
        )

    def record_round(
        self, closed: ClosedRound, scores: dict[str, Any], wall_s: float
    ) -> dict[str, Any]:
        """The round's record (appended to :attr:`history`) once it is evaluated."""
        for overlay in scores.get("poisoned", []):
            self.poison(overlay)
        record: dict[str, Any] = {
            "round": closed.round,
            "accuracy": scores["accuracy"],
            "fl_accuracy": scores["fl_accuracy"],
            "updates": len(closed.contributors),
            "missing": sorted(set(closed.sampled) - set(closed.received)),
            # Closed at the deadline below min_updates: nothing was averaged.
            "aggregated": closed.aggregated,
            "wall_s": round(wall_s, 3),
        }
        if "overlay_rounds" in scores:
            record["overlay_rounds"] = scores["overlay_rounds"]
        self.history.append(record)
        return record

    def poison(self, overlay: str) -> None:
        """Drop ``overlay``'s model from the ensemble and flag it."""
        if self.overlays is not None:
            self.overlays.poison(overlay)

    @property
    def poisoned_overlays(self) -> dict[str, int]:
        return {} if self.overlays is None else dict(sorted(self.overlays.poisoned.items()))

    def ensemble(self) -> Ensemble | None:
        """A snapshot of the FL model and the latest overlay models (for :func:`evaluate`)."""
        return None if self.overlays is None else self.overlays.snapshot(self.model)

    def overlay_rounds(self) -> dict[str, int]:
        return {} if self.overlays is None else self.overlays.rounds()

    def finish(self, final: dict[str, Any]) -> tuple[dict[str, np.ndarray], Outgoing]:
        """The final model state (all of it) and the ``done`` message (the device side)."""
        self.state = RoundState.FINISHED
        state = state_to_numpy(self.model)
        # SplitFed: the devices' half only (the server half stays on the server; it is in
        # the returned state, saved as fl_model.npz).
        sent = self.device_side_state() if self.split is not None else state
        return state, Outgoing(
            Kind.SERVER_DONE, None, Done(final["rounds"], sent, "finished"), retain=True
        )

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint(self, run: str, r: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and metadata after closed round ``r``: all a resumed server needs.

        The global model (all of it, so SplitFed's server half too), the history, the
        controller's decisions and observations, the last probe activations (EMO drift) and
        the last loss. Copies: the driver writes them from a worker thread.
        """
        arrays = {f"model/{k}": v for k, v in state_to_numpy(self.model).items()}
        if self.prev_probe is not None:
            arrays["prev_probe"] = self.prev_probe.copy()
        controller = (
            self.controller.state() if isinstance(self.controller, ConvergenceController) else {}
        )
        meta = {
            "format": 1,
            "run": run,
            "algorithm": self.algorithm.value,
            "round": r,
            "history": list(self.history),
            "decisions": list(self.decisions),
            "rejected_updates": self.rejected_updates,
            "last_loss": self.last_loss,
            "controller": controller,
            "norm_reference": self.norm_reference.norms,
        }
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
        """Take back a :meth:`checkpoint`; the round it was taken after."""
        state = {k[len("model/") :]: v for k, v in arrays.items() if k.startswith("model/")}
        self.prev_probe = arrays.get("prev_probe")
        load_numpy_state(self.model, state)
        self.history = list(meta["history"])
        self.decisions = list(meta["decisions"])
        self.rejected_updates = int(meta["rejected_updates"])
        self.last_loss = float(meta["last_loss"])
        # A checkpoint of an older format has no norms: the restored model seeds them.
        self.norm_reference = NormReference()
        self.norm_reference.restore(meta.get("norm_reference") or [])
        ctl = meta.get("controller") or {}
        if isinstance(self.controller, ConvergenceController) and ctl:
            self.controller.restore(ctl)
        self.round = int(meta["round"])
        return self.round


def evaluate(
    model: FLModel,
    plan: DataPlan,
    final: bool,
    ensemble: Ensemble | None,
    overlay_rounds: dict[str, int],
) -> dict[str, Any]:
    """Score the FL model and the ensemble (runs in a worker thread; touches only its inputs).

    An overlay whose outputs on the validation split are not finite (a poisoned or diverged
    model) is left out of the ensemble and named in ``scores["poisoned"]``.
    """
    split = plan.test if final else plan.eval_subset
    fl = evaluate_model(model, split)
    out: dict[str, Any] = {"fl_accuracy": fl.accuracy, "fl_loss": fl.loss, "accuracy": fl.accuracy}
    if final:
        out["fl_calibrated_accuracy"] = calibrated_accuracy(model, plan.validation, split)
    if ensemble is not None:
        ensemble, poisoned = _without_poisoned(ensemble, plan)
        if poisoned:
            out["poisoned"] = poisoned
    if ensemble is not None:
        ensemble.fit(plan.validation)
        report = ensemble.evaluate(split)
        out["accuracy"] = report.accuracy
        out["ensemble_loss"] = report.loss
        out["overlay_rounds"] = {
            k: v for k, v in overlay_rounds.items() if k not in out.get("poisoned", [])
        }
        if final:
            probs = ensemble.member_proba(split.x)
            out["member_accuracy"] = {
                name: float(np.mean(p.argmax(1) == split.y))
                for name, p in zip(ensemble.members, probs, strict=True)
            }
            out["ensemble"] = ensemble
    elif "poisoned" in out:
        out["overlay_rounds"] = {}
    return out


def calibrated_accuracy(model: FLModel, validation: Split, split: Split) -> float:
    """``model`` alone, calibrated as the ensemble is, scored on ``split``.

    The same :class:`~emo_mqtt.ensemble.Ensemble` fit EMO's ensemble gets (log pooling,
    temperature and per-class bias fitted on the server's validation split), with the model
    as its only member: what calibration alone is worth, so that EMO is not credited with it.
    """
    alone = Ensemble(model, {})
    alone.fit(validation)
    return float(alone.evaluate(split).accuracy)


def _without_poisoned(ensemble: Ensemble, plan: DataPlan) -> tuple[Ensemble | None, list[str]]:
    """The ensemble less the overlays whose outputs on validation samples are not finite."""
    probe = plan.validation.x[:256]
    probs = ensemble.member_proba(probe)
    bad = [
        name
        for name, p in zip(ensemble.members, probs, strict=True)
        if name != "fl" and not bool(np.isfinite(p).all())
    ]
    if not bad:
        return ensemble, []
    keep = {k: v for k, v in ensemble.overlays.items() if k not in bad}
    if not keep:
        return None, bad
    return Ensemble(ensemble.fl_model, keep, scaling=ensemble.scaling), bad
