"""The server node: FedAvg rounds, the SplitFed server half, the controller, and evaluation.

Each round the server samples devices, publishes the round (with the global model) on
``server/round``, collects updates until every sampled device answered or the deadline
passed with at least ``min_updates`` (one silent device never stalls a round), averages
them, and evaluates on the test data it holds. Under EMO it also measures convergence
(trunk drift on probe data, the FL loss trend, the overlays' losses), publishes each
device's activation rate on its control topic, and evaluates the ensemble of the FL model
and the latest overlay models. Under SplitFed it runs the server-side half of the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emo_mqtt.bus import BusOptions
from emo_mqtt.codec import Envelope
from emo_mqtt.config import RunConfig
from emo_mqtt.controller import (
    ConvergenceController,
    SendEverything,
    activation_drift,
)
from emo_mqtt.dataplan import DataPlan
from emo_mqtt.ensemble import Ensemble
from emo_mqtt.fedavg import RoundCollector, fedavg, sample_clients
from emo_mqtt.models import (
    OverlayModel,
    build_fl_model,
    build_overlay_model,
    load_numpy_state,
    state_to_numpy,
)
from emo_mqtt.nodes.base import Node, wait_event
from emo_mqtt.nodes.checkpoint import read_checkpoint, write_checkpoint
from emo_mqtt.nodes.compute import compute
from emo_mqtt.topics import Kind, ParsedTopic, subscription
from emo_mqtt.training import evaluate, seed_everything, sfl_server_step

log = logging.getLogger("emo_mqtt.nodes.server")


def model_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over a state dict's names and bytes: equal digests, bit-identical models."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()


class ServerNode(Node):
    """The FL server (and SplitFed server, and EMO controller and evaluator)."""

    role = "server"

    def __init__(
        self,
        broker: Any,
        config: RunConfig,
        run: str,
        algorithm: str,
        plan: DataPlan,
        *,
        node_id: str = "server",
        out_dir: Path | None = None,
        start_timeout_s: float = 60.0,
        checkpoint_dir: Path | None = None,
        bus_options: BusOptions | None = None,
    ) -> None:
        super().__init__(broker, config, run, node_id, bus_options)
        self.algorithm = algorithm
        self.plan = plan
        self.out_dir = out_dir
        self.start_timeout_s = start_timeout_s
        #: Fault tolerance: after each closed round the server writes its state here
        #: (``server.npz``: numpy arrays only, ``server.json``: metadata; never pickle) and,
        #: when started with a checkpoint present, resumes after its last closed round.
        self.checkpoint_dir = checkpoint_dir
        #: Round the server resumed after (0: a fresh start).
        self.resumed_from = 0
        self._prev_probe: np.ndarray | None = None
        seed_everything(config.run.seed)
        self.model = build_fl_model(config.fl.model)
        self.online: set[str] = set()
        #: Nodes not waited for before round 1 (``emo run`` lists those whose scenario link
        #: starts down: they join through the retained round announcement when it comes up).
        self.skip_start_wait: set[str] = set()
        #: ``time.monotonic()`` when round 1 started (after the start wait): round times count
        #: from it.
        self.rounds_started_at: float | None = None
        self._online_event = asyncio.Event()
        self.collector: RoundCollector | None = None
        self._update_event = asyncio.Event()
        self.history: list[dict[str, Any]] = []
        self.rejected_updates = 0
        self.overlays: dict[str, dict[str, Any]] = {}
        self._overlay_event = asyncio.Event()
        emo = algorithm in ("emo", "emo_all")
        self.emo = emo
        if algorithm == "emo" and config.controller.enabled:
            self.controller: ConvergenceController | SendEverything = ConvergenceController(
                config.controller.policy()
            )
            for device in config.device_ids():
                self.controller.assign(device, config.overlay_of(device))
        else:
            self.controller = SendEverything()
        self.decisions: list[dict[str, Any]] = []
        #: Mean training loss the devices reported with their updates in the last closed
        #: round (FedAvg); SplitFed: mean server-side loss of the round's batches.
        self.last_loss = math.nan
        # SplitFed: the server-side half. V2 shares one head; V1 keeps a copy per device.
        self.sfl = algorithm in ("sfl", "sfl_v1")
        self.heads: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.sfl_losses: list[float] = []
        self._sampled: set[str] = set()
        self._samples: dict[str, int] = {}
        self._losses: list[float] = []
        self.on_json(Kind.STATUS, self._on_status)
        self.on(Kind.DEVICE_UPDATE, self._on_update)
        self.on(Kind.OVERLAY_MODEL, self._on_overlay_model)
        self.on(Kind.DEVICE_SFL_ACTIVATIONS, self._on_sfl_activations)
        self.final: dict[str, Any] = {}
        self._overlay_rounds: dict[str, int] = {}

    async def subscriptions(self) -> list[str]:
        subs = [
            subscription(Kind.STATUS, self.run),
            subscription(Kind.DEVICE_UPDATE, self.run),
        ]
        if self.emo:
            subs.append(subscription(Kind.OVERLAY_MODEL, self.run))
        if self.sfl:
            subs.append(subscription(Kind.DEVICE_SFL_ACTIVATIONS, self.run))
        return subs

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        out.update(algorithm=self.algorithm, rejected_updates=self.rejected_updates,
                   online=sorted(self.online), loss=self.last_loss)
        if self.history:
            last = self.history[-1]
            out["last_round"] = last
            out["accuracy"] = last["accuracy"]
            out["fl_accuracy"] = last["fl_accuracy"]
        # The controller's latest decision for each device (EMO only; empty otherwise).
        latest: dict[str, dict[str, Any]] = {}
        for decision in self.decisions:
            latest[decision["device"]] = decision
        out["controller_decisions"] = dict(sorted(latest.items()))
        return out

    # -- handlers ---------------------------------------------------------------------------
    async def _on_status(self, where: ParsedTopic, body: dict[str, Any]) -> None:
        if where.node is None:
            return
        if body.get("state") == "online":
            self.online.add(where.node)
        else:
            self.online.discard(where.node)
        self._online_event.set()

    async def _on_update(self, where: ParsedTopic, env: Envelope) -> None:
        collector = self.collector
        device = where.node or ""
        if collector is None or int(env.body["round"]) != self.round or device != env.sender:
            self.bus.reject("late_update", f"device/{device}/update",
                            f"update for round {env.body.get('round')} outside round {self.round}")
            return
        state = {k: np.asarray(v) for k, v in env.body["weights"].items()}
        samples = int(env.body["samples"])
        if not collector.add(device, state, samples, time.monotonic()):
            reason = collector.rejected.pop(device, None)
            if reason is not None:
                # Non-finite, mis-shaped or otherwise invalid: never enters the average.
                self.rejected_updates += 1
                self.bus.reject("bad_update", f"device/{device}/update", reason)
            else:
                self.bus.reject("duplicate_update", f"device/{device}/update",
                                "not sampled this round, or already received")
            return
        self._samples[device] = samples
        loss = env.body.get("loss")
        if isinstance(loss, float) and math.isfinite(loss):
            self._losses.append(loss)
        self._update_event.set()

    async def _on_overlay_model(self, where: ParsedTopic, env: Envelope) -> None:
        overlay = where.node or ""
        if overlay not in self.config.overlay_ids():
            self.bus.reject("unknown_overlay", f"overlay/{overlay}/model", overlay)
            return
        model = build_overlay_model(self.config.emo.overlay_model, self.model.activation_shape)
        # fp16 on the wire, decoded back to float32; integer buffers (batch norm) as sent.
        load_numpy_state(model, {k: np.asarray(v) for k, v in env.body["weights"].items()})
        r = int(env.body["round"])
        loss = float(env.body["loss"])
        self.overlays[overlay] = {"model": model, "round": r, "version": int(env.body["version"]),
                                  "loss": loss}
        self.controller.observe_overlay(overlay, r, loss)
        self._overlay_event.set()

    async def _on_sfl_activations(self, where: ParsedTopic, env: Envelope) -> None:
        device = where.node or ""
        r = int(env.body["round"])
        if r != self.round or device not in self._sampled:
            self.bus.reject("late_activations", f"device/{device}/sfl/activations",
                            f"round {r} while at {self.round}")
            return
        key = device if self.algorithm == "sfl_v1" else "shared"
        acts = torch.as_tensor(np.asarray(env.body["activations"]))
        labels = torch.as_tensor(np.asarray(env.body["labels"]))
        loss, grad = sfl_server_step(self.heads[key], self.optimizers[key], acts, labels)
        self.sfl_losses.append(loss)
        self.spawn(self.send(
            Kind.SERVER_SFL_GRADIENTS,
            {"round": r, "batch": int(env.body["batch"]), "gradient": grad},
            msg_kind="sfl.gradients",
            node=device,
        ))

    # -- helpers ----------------------------------------------------------------------------
    def _device_side_state(self) -> dict[str, np.ndarray]:
        return state_to_numpy(self.model.trunk if self.sfl else self.model)

    def _load_device_side(self, state: dict[str, np.ndarray]) -> None:
        load_numpy_state(self.model.trunk if self.sfl else self.model, state)

    def _start_sfl_round(self, sampled: list[str]) -> None:
        head_state = state_to_numpy(self.model.head)
        keys = sampled if self.algorithm == "sfl_v1" else ["shared"]
        self.heads.clear()
        self.optimizers.clear()
        for key in keys:
            head = build_fl_model(self.config.fl.model).head
            load_numpy_state(head, head_state)
            self.heads[key] = head
            self.optimizers[key] = torch.optim.SGD(head.parameters(), lr=self.config.sfl.lr)

    def _finish_sfl_round(self, contributors: dict[str, int]) -> None:
        if self.algorithm == "sfl_v1":
            updates = [(d, state_to_numpy(self.heads[d]), n) for d, n in contributors.items()]
            if updates:
                load_numpy_state(self.model.head, fedavg(updates))
        else:
            load_numpy_state(self.model.head, state_to_numpy(self.heads["shared"]))

    async def _wait_for_fleet(self) -> None:
        expected = set(self.config.device_ids())
        if self.emo:
            expected |= set(self.config.overlay_ids())
        expected -= self.skip_start_wait
        deadline = time.monotonic() + self.start_timeout_s
        while not expected <= self.online:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("server: starting without %s", sorted(expected - self.online))
                return
            await wait_event(self._online_event, min(left, 1.0))

    def _ensemble(self) -> Ensemble | None:
        """A snapshot of the FL model and the latest overlay models (event loop side)."""
        self._overlay_rounds = {k: v["round"] for k, v in sorted(self.overlays.items())}
        if not self.emo or not self.overlays:
            return None
        overlays: dict[str, OverlayModel] = {
            k: v["model"] for k, v in sorted(self.overlays.items())
        }
        return Ensemble(self.model, overlays, scaling=self.config.emo.scaling)

    def _evaluate(self, final: bool, ensemble: Ensemble | None) -> dict[str, Any]:
        """Runs in a worker thread: touches only ``ensemble`` (a snapshot) and the FL model."""
        split = self.plan.test if final else self.plan.eval_subset
        fl = evaluate(self.model, split)
        out: dict[str, Any] = {"fl_accuracy": fl.accuracy, "fl_loss": fl.loss,
                               "accuracy": fl.accuracy}
        if ensemble is not None:
            ensemble.fit(self.plan.validation)
            report = ensemble.evaluate(split)
            out["accuracy"] = report.accuracy
            out["ensemble_loss"] = report.loss
            out["overlay_rounds"] = self._overlay_rounds
            if final:
                probs = ensemble.member_proba(split.x)
                out["member_accuracy"] = {
                    name: float(np.mean(p.argmax(1) == split.y))
                    for name, p in zip(ensemble.members, probs, strict=True)
                }
                out["ensemble"] = ensemble
        return out

    # -- the run ----------------------------------------------------------------------------
    async def main(self) -> None:
        c = self.config
        await self._wait_for_fleet()
        start = self.rounds_started_at = time.monotonic()
        probe = torch.tensor(self.plan.validation.x[: c.controller.probe_samples])
        first = self._load_checkpoint() + 1
        prev_probe = self._prev_probe
        if first > 1:
            # Wall times of a resumed run continue from the checkpointed ones.
            start -= float(self.history[-1]["wall_s"]) if self.history else 0.0
        for r in range(first, c.run.rounds + 1):
            self.round = r
            sampled = sample_clients(c.device_ids(), c.fleet.sample_fraction, c.run.seed, r)
            self._losses = []
            self._sampled = set(sampled)
            self._samples = {}
            sfl_batches = len(self.sfl_losses)
            if self.sfl:
                self._start_sfl_round(sampled)
            if self.emo:
                for device in sampled:
                    decision = self.controller.decide(device, r)
                    self.decisions.append({"round": r, "device": device, **decision.to_dict()})
                    await self.send(Kind.CONTROL, {"round": r, "decision": decision.to_dict()},
                                    msg_kind="control", node=device, retain=True)
            self.collector = RoundCollector(
                round=r, expected=sampled, min_updates=min(c.fleet.min_updates, len(sampled)),
                deadline_s=c.fleet.round_deadline_s, started_at=time.monotonic(),
                reference=self._device_side_state(),
                # Bad input: an update farther than this from the global model is refused.
                max_norm_ratio=c.fleet.max_update_norm_ratio or None,
            )
            await self.send(
                Kind.SERVER_ROUND,
                {"round": r, "algorithm": self.algorithm, "sampled": sampled,
                 "deadline_s": c.fleet.round_deadline_s, "weights": self._device_side_state()},
                msg_kind="round",
                retain=True,
            )
            result = await self._collect(self.collector)
            received = self.collector.received
            self.collector = None
            round_losses = self.sfl_losses[sfl_batches:] if self.sfl else self._losses
            if round_losses:
                self.last_loss = float(np.mean(round_losses))
            contributors: dict[str, int] = {}
            if result is not None:
                self._load_device_side(result.state)
                contributors = {d: self._samples[d] for d in result.contributors}
            if self.sfl:
                self._finish_sfl_round(contributors)
            if self.emo:
                with torch.no_grad():
                    self.model.trunk.eval()
                    cur = self.model.trunk(probe).numpy()
                drift = None if prev_probe is None else activation_drift(prev_probe, cur)
                prev_probe = cur
                mean_loss = float(np.mean(self._losses)) if self._losses else None
                self.controller.observe_round(r, drift, mean_loss)
            scores = await compute(self._evaluate, False, self._ensemble())
            record = {
                "round": r, "accuracy": scores["accuracy"], "fl_accuracy": scores["fl_accuracy"],
                "updates": len(contributors), "missing": sorted(set(sampled) - set(received)),
                # Closed at the deadline below min_updates: nothing was averaged.
                "aggregated": result is not None,
                "wall_s": round(time.monotonic() - start, 3),
            }
            if "overlay_rounds" in scores:
                record["overlay_rounds"] = scores["overlay_rounds"]
            self.history.append(record)
            self._prev_probe = prev_probe
            self._save_checkpoint(r)
            await self.publish_metrics(event="round", **record)
        await self._finish(start)

    # -- checkpoint (fault tolerance) ----------------------------------------------------------
    def _save_checkpoint(self, r: int) -> None:
        """Write the state after closed round ``r``: arrays to npz, the rest to JSON.

        What a resumed server needs to carry on as if nothing happened: the global model
        (all of it, so SplitFed's server half too), the history, the controller decisions
        and its observations, the last probe activations (EMO drift) and the last loss.
        Written to temporary names and renamed, so a crash mid-write keeps the old one.
        """
        if self.checkpoint_dir is None:
            return
        arrays = {f"model/{k}": v for k, v in state_to_numpy(self.model).items()}
        if self._prev_probe is not None:
            arrays["prev_probe"] = self._prev_probe
        controller = (self.controller.state()
                      if isinstance(self.controller, ConvergenceController) else {})
        meta = {"format": 1, "run": self.run, "algorithm": self.algorithm, "round": r,
                "history": self.history, "decisions": self.decisions,
                "rejected_updates": self.rejected_updates, "last_loss": self.last_loss,
                "controller": controller}
        write_checkpoint(self.checkpoint_dir, "server", arrays, meta)

    def _load_checkpoint(self) -> int:
        """Restore the state of a checkpoint of this run; the round it was taken after."""
        found = read_checkpoint(self.checkpoint_dir, "server")
        if found is None:
            return 0
        arrays, meta = found
        if meta.get("run") != self.run or meta.get("algorithm") != self.algorithm:
            log.warning("server: ignoring checkpoint of another run in %s", self.checkpoint_dir)
            return 0
        state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
        self._prev_probe = arrays.get("prev_probe")
        load_numpy_state(self.model, state)
        self.history = list(meta["history"])
        self.decisions = list(meta["decisions"])
        self.rejected_updates = int(meta["rejected_updates"])
        self.last_loss = float(meta["last_loss"])
        ctl = meta.get("controller") or {}
        if isinstance(self.controller, ConvergenceController) and ctl:
            self.controller.restore(ctl)
        self.round = self.resumed_from = int(meta["round"])
        log.info("server: resumed from the checkpoint of round %d in %s", self.round,
                 self.checkpoint_dir)
        return self.round

    async def _collect(self, collector: RoundCollector) -> Any:
        """Wait for the round's updates; None when it closes without enough of them.

        Past the deadline with fewer than ``min_updates``, the round closes unaggregated
        (the global model stays as it was) rather than waiting for devices that may never
        come back: the run goes on and the record shows the missing devices.
        """
        while not collector.ready(time.monotonic()):
            if collector.failed(time.monotonic()):
                log.warning("server: round %d closed at its deadline with %d of %d updates "
                            "needed; the global model is unchanged", collector.round,
                            len(collector.received), collector.min_updates)
                return None
            await wait_event(self._update_event, 0.25)
        if not collector.received:
            log.warning("server: round %d closed with no update", collector.round)
            return None
        return collector.result()

    async def _wait_for_overlays(self, r: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        want = set(self.config.overlay_ids())
        while {k for k, v in self.overlays.items() if v["round"] >= r} != want:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("server: final evaluation without up-to-date overlays")
                return
            await wait_event(self._overlay_event, min(left, 1.0))

    async def _finish(self, start: float) -> None:
        c = self.config
        if self.emo:
            await self._wait_for_overlays(c.run.rounds, c.fleet.round_deadline_s)
        scores = await compute(self._evaluate, True, self._ensemble())
        state = state_to_numpy(self.model)
        self.final = {
            "accuracy": scores["accuracy"],
            "fl_accuracy": scores["fl_accuracy"],
            "member_accuracy": scores.get("member_accuracy"),
            "rounds": c.run.rounds,
            "train_wall_s": round(time.monotonic() - start, 3),
            "fl_model_sha256": model_digest(state),
            "rejected_updates": self.rejected_updates,
        }
        if self.out_dir is not None:
            self._save(scores.get("ensemble"), state)
        await self.send(Kind.SERVER_DONE,
                        {"round": c.run.rounds, "weights": state, "reason": "finished"},
                        msg_kind="done", retain=True)
        await self.publish_metrics(event="done", **{k: v for k, v in self.final.items()})

    def _save(self, ensemble: Ensemble | None, state: dict[str, np.ndarray]) -> None:
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.out_dir / "fl_model.npz", allow_pickle=False, **state)
        if ensemble is not None:
            ensemble.save(self.out_dir / "ensemble.npz")
        meta = {"run": self.run, "algorithm": self.algorithm, "fl_model": self.config.fl.model,
                "history": self.history, "final": self.final, "decisions": self.decisions}
        (self.out_dir / "server.json").write_text(json.dumps(meta, indent=2, default=float))

