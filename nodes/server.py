"""The server node: a driver around :class:`~emo_mqtt.strategies.server.ServerStrategy`.

Each round the strategy samples devices and says what to publish (EMO's control decisions,
then the round with the global model on ``server/round``); the driver publishes it, feeds
the strategy the validated updates (and SplitFed batches, and overlay models) as they
arrive, waits until every sampled device answered or the deadline passed with at least
``min_updates`` (one silent device never stalls a round), closes the round, evaluates in the
compute pool and checkpoints from a worker thread. The algorithm itself lives in the
strategy; this module is about time, the bus and files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.bus import Bus
from emo_mqtt.codec import Envelope
from emo_mqtt.config import RunConfig
from emo_mqtt.dataplan import DataPlan
from emo_mqtt.ensemble import Ensemble
from emo_mqtt.errors import TrainingDiverged
from emo_mqtt.fedavg import RoundCollector, RoundResult
from emo_mqtt.incarnation import new_incarnation
from emo_mqtt.messages import (
    Limits,
    MessageError,
    OverlayModelMsg,
    SflActivations,
    Update,
)
from emo_mqtt.models import FLModel
from emo_mqtt.nodes.base import SERVER_SIDE_KINDS, Node, json_safe, wait_event
from emo_mqtt.nodes.checkpoint import read_checkpoint, write_checkpoint
from emo_mqtt.nodes.compute import compute
from emo_mqtt.nodes.limits import limits_for
from emo_mqtt.strategies.base import Outgoing
from emo_mqtt.strategies.server import ServerStrategy, evaluate, model_digest
from emo_mqtt.telemetry import progress_line
from emo_mqtt.topics import Kind, ParsedTopic, subscription, topic

log = logging.getLogger("emo_mqtt.nodes.server")

__all__ = ["ServerNode", "model_digest"]


class ServerNode(Node):
    """The FL server (and SplitFed server, and EMO controller and evaluator)."""

    role = "server"

    def __init__(
        self,
        bus: Bus,
        config: RunConfig,
        run: str,
        algorithm: str,
        plan: DataPlan,
        *,
        node_id: str = "server",
        out_dir: Path | None = None,
        start_timeout_s: float = 60.0,
        checkpoint_dir: Path | None = None,
        incarnation: str | None = None,
    ) -> None:
        super().__init__(bus, config, run, node_id)
        #: This start of the server (:mod:`emo_mqtt.incarnation`): every server-side message
        #: carries it, and updates answering another start's rounds are refused.
        self.incarnation = new_incarnation() if incarnation is None else incarnation
        self.algorithm = Algorithm.parse(algorithm)
        self.plan = plan
        self.out_dir = out_dir
        self.start_timeout_s = start_timeout_s
        #: Fault tolerance: after each closed round the server writes its state here
        #: (``server.npz``: numpy arrays only, ``server.json``: metadata; never pickle) and,
        #: when started with a checkpoint present, resumes after its last closed round.
        self.checkpoint_dir = checkpoint_dir
        #: Round the server resumed after (0: a fresh start).
        self.resumed_from = 0
        self.strategy = ServerStrategy(config, self.algorithm, plan)
        self.limits: Limits = limits_for(config, self.algorithm, plan)
        self.online: set[str] = set()
        #: Nodes not waited for before round 1 (``emo run`` lists those whose scenario link
        #: starts down: they join through the retained round announcement when it comes up).
        self.skip_start_wait: set[str] = set()
        #: ``time.monotonic()`` when round 1 started (after the start wait): round times count
        #: from it.
        self.rounds_started_at: float | None = None
        self._online_event = asyncio.Event()
        self._update_event = asyncio.Event()
        #: Set when the run's training diverged (SplitFed's server half gave a non-finite
        #: loss or gradient): the round loop ends the run with it.
        self.diverged: TrainingDiverged | None = None
        self._overlay_event = asyncio.Event()
        self.final: dict[str, Any] = {}
        #: The run's lifecycle as published on ``telemetry/run`` (retained): ``starting``,
        #: ``live``, then ``finished``, or ``interrupted`` when the server stops before that.
        self.run_state = "starting"
        self._layout: dict[str, list[str]] | None = None
        self.on_json(Kind.STATUS, self._on_status)
        self.on(
            Kind.DEVICE_UPDATE,
            lambda body, where: Update.from_body(body, limits=self.limits, sender=where.node),
            self._on_update,
        )
        self.on(
            Kind.OVERLAY_MODEL,
            lambda body, _: OverlayModelMsg.from_body(body, limits=self.limits),
            self._on_overlay_model,
        )
        self.on(
            Kind.DEVICE_SFL_ACTIVATIONS,
            lambda body, _: SflActivations.from_body(body, limits=self.limits),
            self._on_sfl_activations,
        )

    # -- what the strategy holds, as the node's attributes (tests, fleet, dashboards) --------
    @property
    def model(self) -> FLModel:
        return self.strategy.model

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.strategy.history

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return self.strategy.decisions

    @property
    def rejected_updates(self) -> int:
        return self.strategy.rejected_updates

    @property
    def collector(self) -> RoundCollector | None:
        return self.strategy.collector

    @property
    def overlays(self) -> dict[str, dict[str, Any]]:
        pool = self.strategy.overlays
        return {} if pool is None else pool.models

    async def subscriptions(self) -> list[str]:
        subs = [
            subscription(Kind.STATUS, self.run),
            subscription(Kind.DEVICE_UPDATE, self.run),
        ]
        if self.algorithm.uses_overlays:
            subs.append(subscription(Kind.OVERLAY_MODEL, self.run))
        if self.algorithm.is_split:
            subs.append(subscription(Kind.DEVICE_SFL_ACTIVATIONS, self.run))
        return subs

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        s = self.strategy
        out.update(
            algorithm=self.algorithm.value,
            incarnation=self.incarnation,
            rejected_updates=s.rejected_updates,
            online=sorted(self.online),
            loss=s.last_loss,
            poisoned_overlays=s.poisoned_overlays,
        )
        if s.history:
            last = s.history[-1]
            out["last_round"] = last
            out["accuracy"] = last["accuracy"]
            out["fl_accuracy"] = last["fl_accuracy"]
        # The controller's latest decision for each device (EMO only; empty otherwise).
        latest: dict[str, dict[str, Any]] = {}
        for decision in s.decisions:
            latest[decision["device"]] = decision
        out["controller_decisions"] = dict(sorted(latest.items()))
        return out

    # -- the run's state, for dashboards (telemetry/run, retained) ---------------------------
    def layout(self) -> dict[str, list[str]]:
        """Overlay (site) -> its devices, from the fleet layout (computed once)."""
        if self._layout is None:
            out: dict[str, list[str]] = {o: [] for o in self.config.overlay_ids()}
            for device in self.config.device_ids():
                out.setdefault(self.config.overlay_of(device), []).append(device)
            self._layout = out
        return self._layout

    def run_state_body(self) -> dict[str, Any]:
        """The retained run state: what a dashboard opened at any time needs to show the run
        as live, finished or interrupted (round k of N), with its accuracy per round."""
        collector = self.strategy.collector
        live = self.run_state == "live" and collector is not None
        closed = self.history[-1]["round"] if self.history else 0
        return {
            "state": self.run_state,
            "run": self.run,
            "algorithm": self.algorithm.value,
            "incarnation": self.incarnation,
            "controller": self.algorithm.controlled and self.config.controller.enabled,
            "overlays": self.algorithm.uses_overlays,
            "round": self.round,
            "closed": closed,
            "rounds": self.config.run.rounds,
            "sampled": sorted(set(collector.expected)) if live and collector else [],
            "history": [
                {k: r.get(k) for k in ("round", "accuracy", "fl_accuracy", "wall_s", "updates")}
                | {"missing": list(r.get("missing", []))}
                for r in self.history
            ],
            "final": self.final or None,
            "layout": self.layout(),
            "time": time.time(),
        }

    async def publish_run_state(self, state: str | None = None) -> None:
        """Publish (retained, QoS 1) the run state, first moving to ``state`` if given."""
        if state is not None:
            self.run_state = state
        payload = json.dumps(json_safe(self.run_state_body()), allow_nan=False).encode()
        await self.bus.publish(topic(Kind.RUN_STATE, self.run), payload, qos=1, retain=True)

    def status_incarnation(self) -> str:
        return self.incarnation

    async def before_goodbye(self) -> None:
        # Stopped before the end (SIGINT/SIGTERM to emo run, a failure): say so, once, so
        # that dashboards show one "interrupted at round k/N" instead of nodes going red.
        if self.run_state != "finished":
            await self.publish_run_state("interrupted")

    # -- handlers ---------------------------------------------------------------------------
    async def _on_status(self, where: ParsedTopic, body: dict[str, Any]) -> None:
        if where.node is None:
            return
        if body.get("state") == "online":
            self.online.add(where.node)
        else:
            self.online.discard(where.node)
        self._online_event.set()

    async def _on_update(self, where: ParsedTopic, env: Envelope, msg: Update) -> None:
        device = where.node or ""
        if msg.incarnation and msg.incarnation != self.incarnation:
            # Trained on another start's round (a queued message from before a restart, or
            # from an old run restored by the broker): the device trains this start's again.
            self.reject_message("update", "stale_incarnation", f"device/{device}/update", "")
            return
        refused = self.strategy.on_update(device, env.sender, msg, time.monotonic())
        if refused is not None:
            self.bus.reject(refused[0], f"device/{device}/update", refused[1])
            return
        self._update_event.set()

    async def _on_overlay_model(
        self, where: ParsedTopic, env: Envelope, msg: OverlayModelMsg
    ) -> None:
        overlay = where.node or ""
        refused = self.strategy.on_overlay_model(overlay, msg)
        if refused is not None:
            reason = (
                "stale_overlay_model"
                if overlay in self.config.overlay_ids()
                else ("unknown_overlay")
            )
            self.bus.reject(reason, f"overlay/{overlay}/model", refused)
            return
        self._overlay_event.set()

    def on_invalid(self, where: ParsedTopic, envelope: Envelope, error: MessageError) -> None:
        # A model with NaN/inf weights or loss is poisoned: out of the ensemble, flagged.
        if (
            where.kind is Kind.OVERLAY_MODEL
            and error.reason == "non_finite"
            and where.node in self.config.overlay_ids()
        ):
            log.warning(
                "server: overlay %s sent a poisoned model (%s); it leaves the ensemble",
                where.node,
                error.detail,
            )
            self.strategy.poison(where.node)

    async def _on_sfl_activations(
        self, where: ParsedTopic, env: Envelope, msg: SflActivations
    ) -> None:
        device = where.node or ""
        source = f"device/{device}/sfl/activations"
        try:
            out = self.strategy.on_sfl_activations(device, msg)
        except MessageError as exc:  # the batch's fault: refused and counted, head untouched
            self.reject_message(msg.KIND, exc.reason, source, exc.detail)
            return
        except TrainingDiverged as exc:
            # Not the device's fault: the run's own training blew up. The round loop raises
            # it (this handler runs in the message loop, which must not die of it).
            if self.diverged is None:
                log.error("server: %s", exc)
                self.diverged = exc
            self._update_event.set()
            return
        if isinstance(out, str):
            self.bus.reject("late_activations", source, out)
            return
        for item in out:
            self.spawn(self.publish(item))

    async def publish(self, item: Outgoing) -> None:
        """Publish one message a strategy returned (with this start's incarnation)."""
        body = item.message.to_body()
        if item.kind in SERVER_SIDE_KINDS:
            body["incarnation"] = self.incarnation
        await self.send(
            item.kind,
            body,
            msg_kind=item.message.KIND,
            node=item.node,
            retain=item.retain,
            qos=item.qos,
            background=item.background,
        )

    # -- the run ----------------------------------------------------------------------------
    async def _wait_for_fleet(self) -> None:
        expected = set(self.config.device_ids())
        if self.algorithm.uses_overlays:
            expected |= set(self.config.overlay_ids())
        expected -= self.skip_start_wait
        deadline = time.monotonic() + self.start_timeout_s
        if not expected <= self.online:
            log.info(
                "server: waiting for %d of %d nodes to come online (up to %g s)",
                len(expected - self.online),
                len(expected),
                self.start_timeout_s,
            )
        # The size check first: a set inclusion per status of a 10,000-device fleet is
        # quadratic, and only a large enough ``online`` can hold every expected node.
        while len(self.online) < len(expected) or not expected <= self.online:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("server: starting without %s", sorted(expected - self.online))
                return
            await wait_event(self._online_event, min(left, 1.0))
        log.info("server: all %d nodes online", len(expected))

    async def _evaluate(self, final: bool) -> dict[str, Any]:
        s = self.strategy
        return await compute(evaluate, s.model, self.plan, final, s.ensemble(), s.overlay_rounds())

    async def main(self) -> None:
        c = self.config
        await self.publish_run_state("live")
        await self._wait_for_fleet()
        start = self.rounds_started_at = time.monotonic()
        first = await self._load_checkpoint() + 1
        if first > 1:
            # Wall times of a resumed run continue from the checkpointed ones.
            start -= float(self.history[-1]["wall_s"]) if self.history else 0.0
        for r in range(first, c.run.rounds + 1):
            self.round = r
            for item in self.strategy.start_round(r, time.monotonic()):
                await self.publish(item)
            collector = self.strategy.collector
            assert collector is not None
            await self.publish_run_state()  # the devices sampled: the dashboard's stragglers
            log.info(
                "server: round %d/%d open: %d devices sampled, %g s deadline",
                r,
                c.run.rounds,
                len(set(collector.expected)),
                c.fleet.round_deadline_s,
            )
            result = await self.collect_round(collector)
            closed = self.strategy.close_round(result)
            scores = await self._evaluate(False)
            record = self.strategy.record_round(closed, scores, time.monotonic() - start)
            await self._save_checkpoint(r)
            await self.publish_metrics(event="round", **record)
            await self.publish_run_state()
            log.info(
                "%s",
                progress_line(
                    self.algorithm.value, c.run.rounds, record, self.bus.stats.published_bytes
                ),
            )
        await self._finish(start)

    async def collect_round(self, collector: RoundCollector) -> RoundResult | None:
        """Wait for the round's updates; None when it closes without enough of them.

        Past the deadline with fewer than ``min_updates``, the round closes unaggregated
        (the global model stays as it was) rather than waiting for devices that may never
        come back: the run goes on and the record shows the missing devices.
        """
        while not collector.ready(time.monotonic()):
            if self.diverged is not None:
                raise self.diverged
            if collector.failed(time.monotonic()):
                log.warning(
                    "server: round %d closed at its deadline with %d of %d updates "
                    "needed; the global model is unchanged",
                    collector.round,
                    len(collector.received),
                    collector.min_updates,
                )
                return None
            await wait_event(self._update_event, 0.25)
        if not collector.received:
            log.warning("server: round %d closed with no update", collector.round)
            return None
        return collector.result()

    # -- checkpoint (fault tolerance) ----------------------------------------------------------
    async def _save_checkpoint(self, r: int) -> None:
        """Write the state after closed round ``r`` from a worker thread (awaited: the next
        round starts after it is on disk). Temporary names, then renames (crash-safe)."""
        if self.checkpoint_dir is None:
            return
        arrays, meta = self.strategy.checkpoint(self.run, r)
        await asyncio.to_thread(write_checkpoint, self.checkpoint_dir, "server", arrays, meta)

    async def _load_checkpoint(self) -> int:
        """Restore the state of a checkpoint of this run; the round it was taken after."""
        found = await asyncio.to_thread(read_checkpoint, self.checkpoint_dir, "server")
        if found is None:
            return 0
        arrays, meta = found
        if meta.get("run") != self.run or meta.get("algorithm") != self.algorithm.value:
            log.warning("server: ignoring checkpoint of another run in %s", self.checkpoint_dir)
            return 0
        self.round = self.resumed_from = self.strategy.restore(arrays, meta)
        log.info(
            "server: resumed from the checkpoint of round %d in %s", self.round, self.checkpoint_dir
        )
        return self.round

    async def _wait_for_overlays(self, r: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pool = self.strategy.overlays
        assert pool is not None
        while not pool.up_to_date(r):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("server: final evaluation without up-to-date overlays")
                return
            await wait_event(self._overlay_event, min(left, 1.0))

    async def _finish(self, start: float) -> None:
        c = self.config
        if self.algorithm.uses_overlays:
            await self._wait_for_overlays(c.run.rounds, c.fleet.round_deadline_s)
        scores = await self._evaluate(True)
        for overlay in scores.get("poisoned", []):
            self.strategy.poison(overlay)
        self.final = {
            "accuracy": scores["accuracy"],
            "fl_accuracy": scores["fl_accuracy"],
            # The FL model (SplitFed: the split model) calibrated as the ensemble is.
            "fl_calibrated_accuracy": scores.get("fl_calibrated_accuracy"),
            "member_accuracy": scores.get("member_accuracy"),
            "rounds": c.run.rounds,
            # From round 1 to the final accuracy: the last round, the wait for the
            # overlays' last models and the final evaluation (fleet.summarize adds the
            # start wait: time_to_final_s).
            "train_wall_s": round(time.monotonic() - start, 3),
            "fl_model_sha256": "",
            "rejected_updates": self.strategy.rejected_updates,
            "poisoned_overlays": self.strategy.poisoned_overlays,
        }
        state, done = self.strategy.finish(self.final)
        self.final["fl_model_sha256"] = model_digest(state)
        if self.out_dir is not None:
            await asyncio.to_thread(self._save, scores.get("ensemble"), state)
        await self.publish(done)
        await self.publish_metrics(event="done", **{k: v for k, v in self.final.items()})
        await self.publish_run_state("finished")
        log.info(
            "server: done: accuracy %.4f (FL model %.4f) after %d rounds",
            self.final["accuracy"],
            self.final["fl_accuracy"],
            c.run.rounds,
        )

    def _save(self, ensemble: Ensemble | None, state: dict[str, np.ndarray]) -> None:
        """The final models and history (in a worker thread; the ensemble holds no poisoned
        overlay: :func:`~emo_mqtt.strategies.server.evaluate` left those out)."""
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.out_dir / "fl_model.npz", allow_pickle=False, **state)
        if ensemble is not None:
            ensemble.save(self.out_dir / "ensemble.npz")
        meta = {
            "run": self.run,
            "algorithm": self.algorithm.value,
            "fl_model": self.config.fl.model,
            # SplitFed: fl_model.npz is the whole split model, this overlay model its
            # server half (emo_mqtt.models.build_split_model).
            "server_model": self.config.emo.overlay_model if self.algorithm.is_split else None,
            "history": self.history,
            "final": self.final,
            "decisions": self.decisions,
        }
        (self.out_dir / "server.json").write_text(json.dumps(meta, indent=2, default=float))
