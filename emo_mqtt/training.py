"""Local FedAvg training, evaluation, overlay replay steps and the SplitFed halves.

Determinism contract: everything random in training is drawn from a ``torch.Generator`` the
caller passes (batch order), never from a global RNG, and the FL models hold no dropout.
The activation callback of :func:`train_local` receives a *copy* of the cut-layer output of
the very forward pass used for the gradient step, so whatever it does (publish, quantise,
even modify the tensor, draw from its own RNG) cannot change a bit of training.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emo_mqtt.data import Split, derive_seed
from emo_mqtt.errors import ConfigError
from emo_mqtt.models import FLModel

__all__ = [
    "ActivationCallback",
    "EvalReport",
    "TrainReport",
    "derive_seed",
    "evaluate",
    "evaluate_proba",
    "make_generator",
    "make_rng",
    "predict_proba",
    "seed_everything",
    "sfl_device_backward",
    "sfl_server_step",
    "train_local",
    "train_overlay_steps",
]

ActivationCallback = Callable[[np.ndarray, torch.Tensor, np.ndarray], None]
"""``(sample_indices, activations, labels)``: indices into the device's ``Split``."""


@dataclass(frozen=True)
class TrainReport:
    """Result of one :func:`train_local` call: mean loss over samples seen, and counts."""

    loss: float
    samples: int
    batches: int


@dataclass(frozen=True)
class EvalReport:
    """Accuracy in [0, 1] and mean cross-entropy over ``samples``."""

    accuracy: float
    loss: float
    samples: int


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (model initialisation uses torch's)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def make_generator(seed: int, *keys: object) -> torch.Generator:
    """A torch generator for the stream (seed, *keys), e.g. ``(seed, "train", device, round)``.

    Different keys give independent streams, so activation sampling and training never share.
    """
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def make_rng(seed: int, *keys: object) -> np.random.Generator:
    """A numpy generator for the stream (seed, *keys); the numpy twin of :func:`make_generator`."""
    return np.random.default_rng(derive_seed(seed, *keys))


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    # A copy: the dataset arrays may be read-only (cached) and torch must not alias them.
    return torch.tensor(np.asarray(x))


def train_local(
    model: FLModel,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    momentum: float = 0.0,
    on_activations: ActivationCallback | None = None,
) -> TrainReport:
    """FedAvg client update: ``epochs`` of minibatch SGD over ``data``, in place.

    A fresh SGD optimiser each call (no state carried between rounds, as in FedAvg). The batch
    order comes from ``generator`` only. ``on_activations(idx, acts, labels)`` is called after
    each step with the batch's indices into ``data``, a detached copy of ``trunk(x)`` from that
    step's forward pass, and the labels; calling it or not leaves the result bit-identical.
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"bad training config: epochs={epochs} batch={batch_size} lr={lr}")
    n = len(data)
    if n == 0:
        return TrainReport(math.nan, 0, 0)
    x_all, y_all = _as_tensor(data.x), _as_tensor(data.y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    total, seen, batches = 0.0, 0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x_all[idx], y_all[idx]
            acts = model.trunk(xb)
            loss = F.cross_entropy(model.head(acts), yb)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            total += float(loss.item()) * int(idx.numel())
            seen += int(idx.numel())
            batches += 1
            if on_activations is not None:
                # Called after the step, with a copy: the callback cannot touch tensors
                # autograd saved, nor the parameters' update.
                on_activations(idx.numpy().copy(), acts.detach().clone(), yb.numpy().copy())
    return TrainReport(total / max(seen, 1), seen, batches)


def _logits_or_probs(
    fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray,
    batch_size: int,
) -> list[torch.Tensor]:
    if isinstance(fn, nn.Module):
        fn.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, int(x.shape[0]), batch_size):
            outs.append(fn(_as_tensor(x[start : start + batch_size])).float())
    return outs


def predict_proba(
    fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray,
    batch_size: int = 1024,
    *,
    outputs: Literal["logits", "probs"] = "logits",
) -> np.ndarray:
    """Class probabilities (N, C) float64 of ``fn`` on ``x`` (no grad, eval mode for modules).

    ``fn`` returns logits by default; pass ``outputs="probs"`` for a function that already
    returns probabilities.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    parts = _logits_or_probs(fn, x, batch_size)
    if not parts:
        return np.zeros((0, 0), dtype=np.float64)
    out = torch.cat(parts).double()
    if outputs == "logits":
        out = torch.softmax(out, dim=1)
    return out.numpy()


def evaluate_proba(probs: np.ndarray, labels: np.ndarray) -> EvalReport:
    """Accuracy and mean negative log-likelihood of given class probabilities."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        return EvalReport(math.nan, math.nan, 0)
    picked = np.clip(probs[np.arange(y.size), y], 1e-12, None)
    acc = float(np.mean(np.argmax(probs, axis=1) == y))
    return EvalReport(acc, float(-np.mean(np.log(picked))), int(y.size))


def evaluate(
    model_or_callable: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    data: Split,
    batch_size: int = 1024,
    *,
    outputs: Literal["logits", "probs"] = "logits",
) -> EvalReport:
    """Accuracy and cross-entropy of a model (or ``x -> logits`` callable) on ``data``."""
    return evaluate_proba(
        predict_proba(model_or_callable, data.x, batch_size, outputs=outputs), data.y
    )


def train_overlay_steps(
    overlay: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
) -> float:
    """One optimiser step per ``(activations, labels)`` batch; the mean loss (nan if none)."""
    overlay.train()
    losses = []
    for acts, labels in batches:
        a = torch.as_tensor(np.asarray(acts) if not isinstance(acts, torch.Tensor) else acts)
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        loss = F.cross_entropy(overlay(a.float()), y.long())
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(float(loss.item()))
    return float(np.mean(losses)) if losses else math.nan


def sfl_server_step(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
) -> tuple[float, torch.Tensor]:
    """Server half of one SplitFed step: head forward/backward/step on received activations.

    Returns the batch loss and the gradient of the loss w.r.t. ``activations`` (same shape),
    which goes back down to the device. When the loss or that gradient is not finite the
    head is not stepped: a non-finite step would leave every later batch non-finite too.
    The caller decides whether the batch or the head is at fault.
    """
    head.train()
    acts = activations.detach().float().clone().requires_grad_(True)
    y = torch.as_tensor(labels).long()
    loss = F.cross_entropy(head(acts), y)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    assert acts.grad is not None  # acts requires grad and feeds the loss
    value, grad = float(loss.item()), acts.grad.detach()
    if math.isfinite(value) and bool(torch.isfinite(grad).all()):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return value, grad


def sfl_device_backward(
    trunk_output: torch.Tensor, grad: torch.Tensor, optimizer: torch.optim.Optimizer
) -> None:
    """Device half of a SplitFed step: backpropagate the server's gradient, step the trunk.

    ``trunk_output`` is the (non-detached) output of the device's trunk forward for the batch.
    """
    if tuple(grad.shape) != tuple(trunk_output.shape):
        raise ConfigError(f"gradient shape {tuple(grad.shape)} != {tuple(trunk_output.shape)}")
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(trunk_output, grad.to(trunk_output.dtype))
    optimizer.step()
