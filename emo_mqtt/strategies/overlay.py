"""The overlay side, sans I/O: the replay cache and when to train on it.

:class:`OverlayStrategy` keeps its devices' activations in the overlay tier of the replay
cache (bounded, keyed by device and sample, tagged with the FL round of each entry, with a
spill tier on disk), tracks which devices delivered which round, and decides which round to
train for: once every device it serves has delivered a round (or the round is overtaken or
overdue). Training is :func:`emo_mqtt.training.train_overlay_steps`, which the driver runs in
its compute pool on the batches :meth:`OverlayStrategy.replay_batches` drew. The methods
that may touch the spill tier's files (:meth:`~OverlayStrategy.store`,
:meth:`~OverlayStrategy.replay_batches`) are plain functions the driver runs in a worker
thread, one at a time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from emo_mqtt import codec
from emo_mqtt.cache import ActivationBatch, ReplayCache, SpillTier
from emo_mqtt.config import RunConfig
from emo_mqtt.data import derive_seed
from emo_mqtt.messages import Activations, Done, OverlayModelMsg, RoundAnnouncement
from emo_mqtt.models import build_fl_model, build_overlay_model, state_to_numpy
from emo_mqtt.training import make_rng

__all__ = ["OverlayStrategy"]


class OverlayStrategy:
    """An overlay's cache, model and replay policy."""

    def __init__(self, config: RunConfig, node_id: str, spill: SpillTier | None) -> None:
        self.config = config
        self.node_id = node_id
        self.devices = config.replays_of(node_id)
        shape = build_fl_model(config.fl.model).activation_shape
        torch.manual_seed(derive_seed(config.run.seed, "overlay-init", node_id))
        self.model = build_overlay_model(config.emo.overlay_model, shape)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.emo.overlay_lr)
        self.cache = ReplayCache(config.emo.cache_entries, shape, spill=spill)
        self.round = 0
        self.expected: dict[int, set[str]] = {}
        self.delivered: dict[int, set[str]] = {}
        self.round_started: dict[int, float] = {}
        self.trained_round = 0
        self.version = 0
        self.last_loss = math.nan
        self.final_round: int | None = None
        self.activation_messages = 0

    def on_round(self, msg: RoundAnnouncement, now: float) -> bool:
        """A new round announced: which of our devices to expect; whether it was new."""
        if msg.round <= self.round:
            return False
        self.round = msg.round
        self.expected[msg.round] = set(msg.sampled) & set(self.devices)
        self.round_started[msg.round] = now
        return True

    def too_far_ahead(self, msg: Activations) -> bool:
        """Activations of a round far beyond the last one announced or trained: refused, or
        a forged far-future round would sit in the cache forever (never stale). The margin
        (``max_staleness + 1`` rounds) covers a restarted overlay that gets its queued
        activations before the round announcement."""
        known = max(self.round, self.trained_round)
        return msg.round > known + 1 + self.config.emo.max_staleness

    def store(self, device: str, msg: Activations) -> None:
        """Cache a device's activations (may spill to disk: run off the event loop)."""
        batch = ActivationBatch(msg.round, msg.sample_ids, msg.labels, msg.data, msg.scale)
        if len(batch):
            self.cache.put(device, batch.sample_ids, batch.activations(), batch.labels, batch.round)

    def stored(self, device: str, msg: Activations) -> bool:
        """After :meth:`store`: whether the device's round is now delivered."""
        self.activation_messages += 1
        if msg.last:
            self.delivered.setdefault(msg.round, set()).add(device)
        return msg.last

    def on_done(self, msg: Done) -> None:
        self.final_round = msg.round

    def ready_round(self, now: float) -> int | None:
        """The newest round worth training for: complete, overtaken, or overdue."""
        for r in sorted(self.expected, reverse=True):
            if r <= self.trained_round:
                return None
            complete = self.expected[r] <= self.delivered.get(r, set())
            overdue = now - self.round_started[r] > self.config.fleet.round_deadline_s
            if complete or r < self.round or overdue:
                return r
        return None

    @property
    def finished(self) -> bool:
        return self.final_round is not None and self.trained_round >= self.final_round

    def replay_batches(self, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Purge stale entries, then draw round ``r``'s replay batches (may read spill files:
        run off the event loop)."""
        c = self.config.emo
        self.cache.purge_stale(r, c.max_staleness)
        # The upper tier is part of the replay set: when the cache overflowed, half of it
        # is swapped with fresh entries from disk each round (ReplayCache.rotate), so the
        # overlay cycles through everything its devices sent, not only the newest entries.
        self.cache.rotate(r, c.max_staleness, self.cache.capacity // 2)
        rng = make_rng(self.config.run.seed, "overlay", self.node_id, r)
        batches = []
        for _ in range(c.overlay_steps_per_round):
            got = self.cache.sample(c.overlay_batch_size, r, c.max_staleness, rng)
            if got is None:
                break
            batches.append((got[0], got[1]))
        return batches

    def trained(self, r: int, loss: float | None) -> OverlayModelMsg | None:
        """Round ``r`` trained (``loss`` None: nothing to train on); the model to publish."""
        self.trained_round = r
        if loss is None:
            return None
        self.last_loss = loss
        self.version += 1
        weights: dict[str, Any] = {}
        for name, value in state_to_numpy(self.model).items():
            # Weights travel as fp16 (half the bytes); integer buffers as they are.
            weights[name] = codec.fp16(value) if value.dtype.kind == "f" else value
        return OverlayModelMsg(r, self.version, weights, loss, len(self.cache))

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint(self, run: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Model, optimiser state, version, trained round and the cache's entries (copies)."""
        arrays: dict[str, np.ndarray] = {
            f"model/{k}": v for k, v in state_to_numpy(self.model).items()
        }
        opt = self.optimizer.state_dict()
        for index, per_param in opt["state"].items():
            for name, value in per_param.items():
                arrays[f"opt/{index}/{name}"] = (
                    value.detach().cpu().numpy().copy()
                    if isinstance(value, torch.Tensor)
                    else np.asarray(value)
                )
        block = self.cache.snapshot()  # the overlay tier, oldest insertion first
        devices = sorted(set(block.device_ids.tolist()))
        arrays["cache/device"] = np.array(
            [devices.index(str(x)) for x in block.device_ids], dtype=np.int64
        )
        arrays["cache/sample_ids"] = block.sample_ids
        arrays["cache/acts"] = block.activations
        arrays["cache/labels"] = block.labels
        arrays["cache/rounds"] = block.rounds
        meta = {
            "format": 1,
            "run": run,
            "id": self.node_id,
            "version": self.version,
            "trained_round": self.trained_round,
            "loss": self.last_loss,
            "param_groups": opt["param_groups"],
            "cache_devices": devices,
        }
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.model.load_state_dict(
            {
                k[len("model/") :]: torch.from_numpy(v.copy())
                for k, v in arrays.items()
                if k.startswith("model/")
            }
        )
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
                self.cache.put(
                    device,
                    arrays["cache/sample_ids"][pick],
                    arrays["cache/acts"][pick].reshape(-1, *self.cache.activation_shape),
                    arrays["cache/labels"][pick],
                    int(r),
                )
        self.version = int(meta["version"])
        self.trained_round = int(meta["trained_round"])
        self.last_loss = float(meta["loss"])
