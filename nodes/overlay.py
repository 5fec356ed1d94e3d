"""The overlay node: a driver around :class:`~emo_mqtt.strategies.overlay.OverlayStrategy`.

It subscribes only to the activation topics of the devices it serves and keeps what they
publish in the replay cache; once a round is ready it takes ``overlay_steps_per_round``
replay steps (in the compute pool) and publishes a new version of its model. Everything that
may touch the disk (the cache's spill tier, checkpoints) runs in a worker thread, one
operation at a time under :attr:`OverlayNode.cache_lock`, so the event loop never waits on
a file and the cache is never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.bus import Bus
from emo_mqtt.cache import ReplayCache, SpillTier
from emo_mqtt.codec import Envelope
from emo_mqtt.config import RunConfig
from emo_mqtt.errors import PublishTimeout
from emo_mqtt.messages import Activations, Done, RoundAnnouncement
from emo_mqtt.models import OverlayModel
from emo_mqtt.nodes.base import Node, wait_event
from emo_mqtt.nodes.checkpoint import read_checkpoint, write_checkpoint
from emo_mqtt.nodes.compute import compute
from emo_mqtt.nodes.limits import limits_for
from emo_mqtt.strategies.overlay import OverlayStrategy
from emo_mqtt.topics import Kind, ParsedTopic, topic
from emo_mqtt.training import train_overlay_steps

log = logging.getLogger("emo_mqtt.nodes.overlay")


class OverlayNode(Node):
    """An edge overlay serving a subset of the fleet's devices."""

    role = "overlay"

    def __init__(
        self,
        bus: Bus,
        config: RunConfig,
        run: str,
        node_id: str,
        *,
        spill_dir: Path | None = None,
        checkpoint_dir: Path | None = None,
    ) -> None:
        super().__init__(bus, config, run, node_id)
        spill = None
        if spill_dir is not None and config.emo.spill_mib > 0:
            spill = SpillTier(spill_dir, config.emo.spill_mib * 2**20)
        self.strategy = OverlayStrategy(config, node_id, spill)
        self.devices = self.strategy.devices
        self.limits = limits_for(config, Algorithm.EMO)
        #: Held while a worker thread uses the cache (puts, replay draws, snapshots).
        self.cache_lock = asyncio.Lock()
        self._work = asyncio.Event()
        #: Fault tolerance: after each training the overlay writes its model, optimiser
        #: state, version, trained round and cache here (``overlay.npz``: numpy arrays
        #: only; ``overlay.json``: metadata; never pickle), and starts from it when present.
        self.checkpoint_dir = checkpoint_dir
        #: Version of the checkpoint this overlay started from (0: a fresh start).
        self.resumed_version = 0
        # Read before the loop runs (a constructor cannot await); done once per process.
        self._load_checkpoint()
        self.on(
            Kind.DEVICE_ACTIVATIONS,
            lambda body, _: Activations.from_body(body, limits=self.limits),
            self._on_activations,
        )
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

    # -- the strategy's state, as the node's attributes ---------------------------------------
    @property
    def cache(self) -> ReplayCache:
        return self.strategy.cache

    @property
    def model(self) -> OverlayModel:
        return self.strategy.model

    @property
    def version(self) -> int:
        return self.strategy.version

    @property
    def trained_round(self) -> int:
        return self.strategy.trained_round

    async def subscriptions(self) -> list[str]:
        subs = [topic(Kind.DEVICE_ACTIVATIONS, self.run, node=d) for d in self.devices]
        return [*subs, topic(Kind.SERVER_ROUND, self.run), topic(Kind.SERVER_DONE, self.run)]

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        st = self.strategy
        s = st.cache.stats
        out.update(
            version=st.version,
            resumed_version=self.resumed_version,
            trained_round=st.trained_round,
            loss=st.last_loss,
            cache=st.cache.occupancy(self.round),
            cache_stats={
                "offered": s.offered,
                "evicted": s.evicted,
                "purged": s.purged,
                "refilled": s.refilled,
                "sampled_entries": s.sampled_entries,
                "spilled": s.spilled,
            },
        )
        spill = st.cache.spill
        out.update(
            spill_bytes=0 if spill is None else spill.bytes,
            spill_blocks=0 if spill is None else spill.blocks,
            spill_capacity_bytes=0 if spill is None else spill.max_bytes,
            spill_entries_written=0 if spill is None else spill.stats.entries_written,
            spill_entries_dropped=0 if spill is None else spill.stats.entries_dropped,
            spill_entries_taken=0 if spill is None else spill.stats.entries_taken,
        )
        return out

    # -- handlers ---------------------------------------------------------------------------
    def on_new_incarnation(self, incarnation: str) -> None:
        # Another start of the server: take its round announcements from wherever it starts.
        self.strategy.round = 0

    async def _on_round(self, where: ParsedTopic, env: Envelope, msg: RoundAnnouncement) -> None:
        if self.strategy.on_round(msg, time.monotonic()):
            self.round = self.strategy.round
            self._work.set()

    async def _on_activations(self, where: ParsedTopic, env: Envelope, msg: Activations) -> None:
        device = where.node or ""
        if device not in self.devices or env.sender != device:
            self.bus.reject("foreign_device", f"device/{device}/activations", env.sender)
            return
        if self.strategy.too_far_ahead(msg):
            self.reject_message(
                msg.KIND,
                "ahead",
                f"device/{device}/activations",
                f"round {msg.round} while at {self.round}",
            )
            return
        async with self.cache_lock:
            await asyncio.to_thread(self.strategy.store, device, msg)
        if self.strategy.stored(device, msg):
            self._work.set()

    async def _on_done(self, where: ParsedTopic, env: Envelope, msg: Done) -> None:
        self.strategy.on_done(msg)
        self._work.set()

    # -- training ---------------------------------------------------------------------------
    async def _train(self, r: int) -> None:
        st = self.strategy
        async with self.cache_lock:
            # Drawn in a worker thread (the spill tier may be read), one cache user at a time.
            batches = await asyncio.to_thread(st.replay_batches, r)
        loss = (
            await compute(train_overlay_steps, st.model, st.optimizer, batches) if batches else None
        )
        msg = st.trained(r, loss)
        if msg is not None:
            try:
                await self.send(
                    Kind.OVERLAY_MODEL, msg.to_body(), msg_kind=msg.KIND, node=self.node_id
                )
            except PublishTimeout as exc:
                # A broker (or a loop) busy with thousands of devices: this version is lost,
                # the next one supersedes it; the overlay must not die of it.
                log.warning("overlay %s: round %d model not published: %s", self.node_id, r, exc)
                return
            await self.publish_metrics()

    async def main(self) -> None:
        while not self.stopping.is_set():
            r = self.strategy.ready_round(time.monotonic())
            if r is not None:
                await self._train(r)
                await self._save_checkpoint()
                continue
            if self.strategy.finished:
                return
            await wait_event(self._work, 1.0)

    # -- checkpoint (fault tolerance) ----------------------------------------------------------
    async def _save_checkpoint(self) -> None:
        """Snapshot model, optimiser, version, trained round and cache; write it off the loop."""
        if self.checkpoint_dir is None:
            return
        async with self.cache_lock:
            arrays, meta = self.strategy.checkpoint(self.run)
        await asyncio.to_thread(write_checkpoint, self.checkpoint_dir, "overlay", arrays, meta)

    def _load_checkpoint(self) -> None:
        found = read_checkpoint(self.checkpoint_dir, "overlay")
        if found is None:
            return
        arrays, meta = found
        if meta.get("run") != self.run or meta.get("id") != self.node_id:
            log.warning(
                "overlay %s: ignoring checkpoint of another run in %s",
                self.node_id,
                self.checkpoint_dir,
            )
            return
        self.strategy.restore(arrays, meta)
        self.resumed_version = self.strategy.version
        log.info(
            "overlay %s: resumed from version %d (round %d, %d cached entries)",
            self.node_id,
            self.strategy.version,
            self.strategy.trained_round,
            len(self.strategy.cache),
        )
