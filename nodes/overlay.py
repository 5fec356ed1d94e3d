"""The overlay node: caches its devices' activations and trains a larger model by replay.

It subscribes only to the activation topics of the devices it serves and keeps what they
publish in the overlay tier of the replay cache (bounded, keyed by device and sample,
tagged with the FL round that produced each entry, spilling to a disk tier when full).
Training is decoupled from FL: once every device it serves has delivered a round's
activations (or the round is overtaken or overdue), it takes ``overlay_steps_per_round``
replay steps on fresh-enough entries and publishes a new version of its model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emo_mqtt import codec
from emo_mqtt.bus import BusOptions
from emo_mqtt.cache import ActivationBatch, ReplayCache, SpillTier
from emo_mqtt.codec import Envelope
from emo_mqtt.config import RunConfig
from emo_mqtt.data import derive_seed
from emo_mqtt.models import build_fl_model, build_overlay_model, state_to_numpy
from emo_mqtt.nodes.base import Node, wait_event
from emo_mqtt.nodes.checkpoint import read_checkpoint, write_checkpoint
from emo_mqtt.nodes.compute import compute
from emo_mqtt.topics import Kind, ParsedTopic, topic
from emo_mqtt.training import make_rng, train_overlay_steps

log = logging.getLogger("emo_mqtt.nodes.overlay")


class OverlayNode(Node):
    """An edge overlay serving a subset of the fleet's devices."""

    role = "overlay"

    def __init__(
        self,
        broker: Any,
        config: RunConfig,
        run: str,
        node_id: str,
        *,
        spill_dir: Path | None = None,
        checkpoint_dir: Path | None = None,
        bus_options: BusOptions | None = None,
    ) -> None:
        super().__init__(broker, config, run, node_id, bus_options)
        self.devices = config.devices_of(node_id)
        shape = build_fl_model(config.fl.model).activation_shape
        torch.manual_seed(derive_seed(config.run.seed, "overlay-init", node_id))
        self.model = build_overlay_model(config.emo.overlay_model, shape)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.emo.overlay_lr)
        spill = None
        if spill_dir is not None and config.emo.spill_mib > 0:
            spill = SpillTier(spill_dir, config.emo.spill_mib * 2**20)
        self.cache = ReplayCache(config.emo.cache_entries, shape, spill=spill)
        self.expected: dict[int, set[str]] = {}
        self.delivered: dict[int, set[str]] = {}
        self.round_started: dict[int, float] = {}
        self.trained_round = 0
        self.version = 0
        self.last_loss = math.nan
        self.final_round: int | None = None
        self.activation_messages = 0
        self._work = asyncio.Event()
        #: Fault tolerance: after each training the overlay writes its model, optimiser
        #: state, version, trained round and cache here (``overlay.npz``: numpy arrays
        #: only; ``overlay.json``: metadata; never pickle), and starts from it when present.
        self.checkpoint_dir = checkpoint_dir
        #: Version of the checkpoint this overlay started from (0: a fresh start).
        self.resumed_version = 0
        self._load_checkpoint()
        self.on(Kind.DEVICE_ACTIVATIONS, self._on_activations)
        self.on(Kind.SERVER_ROUND, self._on_round)
        self.on(Kind.SERVER_DONE, self._on_done)

    async def subscriptions(self) -> list[str]:
        subs = [topic(Kind.DEVICE_ACTIVATIONS, self.run, node=d) for d in self.devices]
        return [*subs, topic(Kind.SERVER_ROUND, self.run), topic(Kind.SERVER_DONE, self.run)]

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        s = self.cache.stats
        out.update(
            version=self.version, resumed_version=self.resumed_version,
            trained_round=self.trained_round, loss=self.last_loss,
            cache=self.cache.occupancy(self.round),
            cache_stats={"offered": s.offered, "evicted": s.evicted, "purged": s.purged,
                         "refilled": s.refilled, "sampled_entries": s.sampled_entries,
                         "spilled": s.spilled},
        )
        spill = self.cache.spill
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
    async def _on_round(self, where: ParsedTopic, env: Envelope) -> None:
        r = int(env.body["round"])
        if r <= self.round:
            return
        self.round = r
        self.expected[r] = set(env.body["sampled"]) & set(self.devices)
        self.round_started[r] = time.monotonic()
        self._work.set()

    async def _on_activations(self, where: ParsedTopic, env: Envelope) -> None:
        device = where.node or ""
        if device not in self.devices or env.sender != device:
            self.bus.reject("foreign_device", f"device/{device}/activations", env.sender)
            return
        b = env.body
        batch = ActivationBatch(
            int(b["round"]), np.asarray(b["sample_ids"]), np.asarray(b["labels"]),
            np.asarray(b["data"]), None if b["scale"] is None else np.asarray(b["scale"]),
        )
        if len(batch):
            self.cache.put(device, batch.sample_ids, batch.activations(), batch.labels, batch.round)
        self.activation_messages += 1
        if b.get("last"):
            self.delivered.setdefault(batch.round, set()).add(device)
            self._work.set()

    async def _on_done(self, where: ParsedTopic, env: Envelope) -> None:
        self.final_round = int(env.body["round"])
        self._work.set()

    # -- training ---------------------------------------------------------------------------
    def _ready_round(self) -> int | None:
        """The newest round worth training for: complete, overtaken, or overdue."""
        now = time.monotonic()
        for r in sorted(self.expected, reverse=True):
            if r <= self.trained_round:
                return None
            complete = self.expected[r] <= self.delivered.get(r, set())
            overdue = now - self.round_started[r] > self.config.fleet.round_deadline_s
            if complete or r < self.round or overdue:
                return r
        return None

    async def _train(self, r: int) -> None:
        c = self.config.emo
        rng = make_rng(self.config.run.seed, "overlay", self.node_id, r)
        # Sampled here, on the event loop that owns the cache; trained in a worker thread.
        batches = []
        for _ in range(c.overlay_steps_per_round):
            got = self.cache.sample(c.overlay_batch_size, r, c.max_staleness, rng)
            if got is None:
                break
            batches.append((got[0], got[1]))
        if not batches:
            return
        self.last_loss = await compute(train_overlay_steps, self.model, self.optimizer, batches)
        self.version += 1
        weights: dict[str, Any] = {}
        for name, value in state_to_numpy(self.model).items():
            # Weights travel as fp16 (half the bytes); integer buffers as they are.
            weights[name] = codec.fp16(value) if value.dtype.kind == "f" else value
        await self.send(
            Kind.OVERLAY_MODEL,
            {"round": r, "version": self.version, "weights": weights, "loss": self.last_loss,
             "entries": len(self.cache)},
            msg_kind="overlay.model",
            node=self.node_id,
        )
        await self.publish_metrics()

    async def main(self) -> None:
        while not self.stopping.is_set():
            r = self._ready_round()
            if r is not None:
                self.cache.purge_stale(r, self.config.emo.max_staleness)
                await self._train(r)
                self.trained_round = r
                self._save_checkpoint()
                continue
            if self.final_round is not None and self.trained_round >= self.final_round:
                return
            await wait_event(self._work, 1.0)

    # -- checkpoint (fault tolerance) ----------------------------------------------------------
    def _save_checkpoint(self) -> None:
        """Write model, optimiser state, version, trained round and the cache's entries."""
        if self.checkpoint_dir is None:
            return
        arrays: dict[str, np.ndarray] = {
            f"model/{k}": v for k, v in state_to_numpy(self.model).items()
        }
        opt = self.optimizer.state_dict()
        for index, per_param in opt["state"].items():
            for name, value in per_param.items():
                arrays[f"opt/{index}/{name}"] = (
                    value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                    else np.asarray(value)
                )
        block = self.cache.snapshot()  # the overlay tier, oldest insertion first
        devices = sorted(set(block.device_ids.tolist()))
        arrays["cache/device"] = np.array(
            [devices.index(str(x)) for x in block.device_ids], dtype=np.int64)
        arrays["cache/sample_ids"] = block.sample_ids
        arrays["cache/acts"] = block.activations
        arrays["cache/labels"] = block.labels
        arrays["cache/rounds"] = block.rounds
        meta = {"format": 1, "run": self.run, "id": self.node_id, "version": self.version,
                "trained_round": self.trained_round, "loss": self.last_loss,
                "param_groups": opt["param_groups"], "cache_devices": devices}
        write_checkpoint(self.checkpoint_dir, "overlay", arrays, meta)

    def _load_checkpoint(self) -> None:
        found = read_checkpoint(self.checkpoint_dir, "overlay")
        if found is None:
            return
        arrays, meta = found
        if meta.get("run") != self.run or meta.get("id") != self.node_id:
            log.warning("overlay %s: ignoring checkpoint of another run in %s", self.node_id,
                        self.checkpoint_dir)
            return
        self.model.load_state_dict({
            k[len("model/"):]: torch.from_numpy(v.copy())
            for k, v in arrays.items() if k.startswith("model/")
        })
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in arrays.items():
            if key.startswith("opt/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = torch.from_numpy(value.copy())
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        devices = meta["cache_devices"]
        owner = arrays["cache/device"]
        rounds = arrays["cache/rounds"]
        # Re-insert by (device, round) groups in the order they were saved.
        for i, device in enumerate(devices):
            for r in np.unique(rounds[owner == i]):
                pick = (owner == i) & (rounds == r)
                self.cache.put(device, arrays["cache/sample_ids"][pick],
                               arrays["cache/acts"][pick].reshape(-1, *self.cache.activation_shape),
                               arrays["cache/labels"][pick], int(r))
        self.version = self.resumed_version = int(meta["version"])
        self.trained_round = int(meta["trained_round"])
        self.last_loss = float(meta["loss"])
        log.info("overlay %s: resumed from version %d (round %d, %d cached entries)",
                 self.node_id, self.version, self.trained_round, len(self.cache))
