"""Ensemble inference: the FL model plus overlay models, combined with fitted weights.

Two poolings of member probabilities ``p_i`` (each (N, C)):

- ``linear``: ``p = sum_i w_i p_i`` with ``w`` on the simplex (:func:`fit_weights`,
  :func:`combine`);
- ``log`` (logarithmic opinion pool): ``log p = t * sum_i w_i log p_i + b - log Z`` with ``w``
  on the simplex, a temperature ``t > 0`` and a per-class bias ``b``. Overlays see only
  their own devices' label-skewed data, so each member's label prior is off; the bias
  corrects the pooled prior, which the linear pool cannot. On validation data it beat
  the linear pool by 1.5 points at Dirichlet alpha 0.3 and by 6 at alpha 0.1 (seeds 1-3,
  docs/algorithms.md section 7), so :class:`Ensemble` defaults to it.

All weights are fitted on a validation split by maximum likelihood with L-BFGS in float64
from a fixed start: deterministic.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from emo_mqtt.data import Split
from emo_mqtt.errors import ConfigError
from emo_mqtt.models import (
    FLModel,
    OverlayModel,
    build_fl_model,
    build_overlay_model,
    load_numpy_state,
    state_to_numpy,
)
from emo_mqtt.training import EvalReport, evaluate_proba

__all__ = [
    "Combiner",
    "Ensemble",
    "Pooling",
    "combine",
    "fit_combiner",
    "fit_weights",
]

Pooling = Literal["linear", "log"]
_EPS = 1e-12


def _stack(probs: Sequence[np.ndarray], labels: np.ndarray | None = None) -> np.ndarray:
    if not probs:
        raise ConfigError("need at least one member's probabilities")
    arr = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    if arr.ndim != 3:
        raise ConfigError(f"probabilities must be (N, C) each, got {arr.shape[1:]}")
    if labels is not None and np.asarray(labels).shape != (arr.shape[1],):
        raise ConfigError(f"labels {np.asarray(labels).shape} do not match {arr.shape[1]} rows")
    return arr


def minimize_lbfgs(params: list[torch.Tensor], loss_fn: Any, max_iter: int = 200) -> None:
    """Minimise ``loss_fn()`` over ``params`` in place with L-BFGS (strong Wolfe line search):
    the deterministic fit every combiner here uses (benchmarks/offline_emo.py too)."""
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss: torch.Tensor = loss_fn()
        torch.autograd.backward(loss)
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]


def fit_weights(
    probs: Sequence[np.ndarray], labels: np.ndarray, *, max_iter: int = 200
) -> np.ndarray:
    """Simplex weights maximising the validation log-likelihood of the linear pool.

    Softmax-parametrised, L-BFGS from equal weights (the optimum of a concave problem, so
    the start only matters for ties). float64 (M,), non-negative, summing to 1.
    """
    stacked = _stack(probs, labels)
    if stacked.shape[0] == 1:
        return np.ones(1)
    p = torch.from_numpy(stacked)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    picked = p[:, torch.arange(y.numel()), y]  # (M, N)
    theta = torch.zeros(stacked.shape[0], dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        mix = (torch.softmax(theta, 0)[:, None] * picked).sum(0)
        return -torch.log(mix + _EPS).mean()

    minimize_lbfgs([theta], loss, max_iter)
    w = torch.softmax(theta.detach(), 0).numpy()
    out: np.ndarray = w / w.sum()
    return out


def combine(probs: Sequence[np.ndarray], weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """Linear pool ``sum_i w_i p_i`` (float64 (N, C))."""
    stacked = _stack(probs)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (stacked.shape[0],) or np.any(w < 0) or not np.isclose(w.sum(), 1.0):
        raise ConfigError(f"weights must be {stacked.shape[0]} non-negative values summing to 1")
    out: np.ndarray = np.tensordot(w, stacked, axes=1)
    return out


@dataclass(frozen=True)
class Combiner:
    """A fitted pooling of member probabilities; see the module docstring."""

    pooling: Pooling
    weights: np.ndarray
    temperature: float = 1.0
    class_bias: np.ndarray | None = None

    def __call__(self, probs: Sequence[np.ndarray]) -> np.ndarray:
        if self.pooling == "linear":
            return combine(probs, self.weights)
        logp = np.log(np.clip(_stack(probs), _EPS, None))
        z = self.temperature * np.tensordot(self.weights, logp, axes=1)
        if self.class_bias is not None:
            z = z + self.class_bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return out

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"weights": np.asarray(self.weights, dtype=np.float64)}
        if self.class_bias is not None:
            arrays["class_bias"] = np.asarray(self.class_bias, dtype=np.float64)
        return {"pooling": self.pooling, "temperature": float(self.temperature)}, arrays

    @classmethod
    def from_state(cls, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Combiner:
        pooling = config.get("pooling")
        if pooling not in ("linear", "log"):
            raise ConfigError(f"unknown pooling {pooling!r}")
        return cls(
            pooling,
            np.asarray(arrays["weights"], dtype=np.float64),
            float(config.get("temperature", 1.0)),
            None if "class_bias" not in arrays else np.asarray(arrays["class_bias"], np.float64),
        )


def fit_combiner(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    pooling: Pooling = "log",
    *,
    class_bias: bool = True,
    bias_l2: float = 1e-3,
    max_iter: int = 200,
) -> Combiner:
    """Fit a :class:`Combiner` on validation probabilities and labels (maximum likelihood).

    For ``log`` pooling, the weights, the temperature and (if ``class_bias``) a per-class bias
    with a small L2 penalty (``bias_l2``; keeps it bounded on small validation sets).
    """
    if pooling == "linear":
        return Combiner("linear", fit_weights(probs, labels, max_iter=max_iter))
    if pooling != "log":
        raise ConfigError(f"unknown pooling {pooling!r}")
    stacked = _stack(probs, labels)
    logp = torch.from_numpy(np.log(np.clip(stacked, _EPS, None)))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n_members, _, n_classes = stacked.shape
    theta = torch.zeros(n_members, dtype=torch.float64, requires_grad=True)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=class_bias)

    def loss() -> torch.Tensor:
        w = torch.softmax(theta, 0)
        z = torch.exp(log_t) * torch.einsum("m,mnc->nc", w, logp) + bias
        return F.cross_entropy(z, y) + bias_l2 * (bias**2).sum()

    minimize_lbfgs([theta, log_t, bias] if class_bias else [theta, log_t], loss, max_iter)
    w = torch.softmax(theta.detach(), 0).numpy()
    return Combiner(
        "log",
        w / w.sum(),
        float(torch.exp(log_t.detach())),
        bias.detach().numpy().copy() if class_bias else None,
    )


Scaling = Literal["horizontal", "vertical"]


class Ensemble:
    """FL model + overlay models, combined by a :class:`Combiner`.

    ``horizontal``: members are the FL head and every overlay, side by side on the trunk's
    activations. ``vertical``: members are the overlays stacked on the trunk (deeper model),
    blended with the FL head only if ``blend_fl``. Either way the trunk runs once per input.
    Until :meth:`fit` is called the members are averaged with equal weights.
    """

    def __init__(
        self,
        fl_model: FLModel,
        overlays: Mapping[str, OverlayModel],
        *,
        scaling: Scaling = "horizontal",
        blend_fl: bool | None = None,
        combiner: Combiner | None = None,
    ) -> None:
        if scaling not in ("horizontal", "vertical"):
            raise ConfigError(f"scaling must be horizontal or vertical, got {scaling!r}")
        if "fl" in overlays:
            raise ConfigError("'fl' is reserved for the FL head; rename that overlay")
        self.fl_model = fl_model
        self.overlays = dict(sorted(overlays.items()))
        self.scaling: Scaling = scaling
        self.blend_fl = scaling == "horizontal" if blend_fl is None else bool(blend_fl)
        if scaling == "horizontal" and not self.blend_fl:
            raise ConfigError("horizontal scaling always includes the FL head")
        if not self.members:
            raise ConfigError("a vertical ensemble without the FL head needs an overlay")
        n = len(self.members)
        self.combiner = combiner or Combiner("linear", np.full(n, 1.0 / n))
        if self.combiner.weights.shape != (n,):
            raise ConfigError(f"combiner has {self.combiner.weights.shape} weights for {n}")

    @property
    def members(self) -> list[str]:
        """Member names in pooling order: ``"fl"`` (if blended), then overlays by name."""
        return (["fl"] if self.blend_fl else []) + list(self.overlays)

    def member_proba(self, x: np.ndarray, batch_size: int = 1024) -> list[np.ndarray]:
        """Per-member class probabilities (float64 (N, C) each) on inputs ``x``."""
        modules = [self.fl_model, *self.overlays.values()]
        for m in modules:
            m.eval()
        outs: list[list[torch.Tensor]] = [[] for _ in self.members]
        with torch.no_grad():
            for start in range(0, int(x.shape[0]), batch_size):
                acts = self.fl_model.trunk(torch.tensor(np.asarray(x[start : start + batch_size])))
                logits = [self.fl_model.head(acts)] if self.blend_fl else []
                logits += [ov(acts) for ov in self.overlays.values()]
                for i, z in enumerate(logits):
                    outs[i].append(torch.softmax(z.double(), dim=1))
        return [torch.cat(o).numpy() if o else np.zeros((0, 0)) for o in outs]

    def fit(self, val: Split, pooling: Pooling = "log", **kwargs: Any) -> Combiner:
        """Fit the combiner on a validation split; returns (and keeps) it."""
        self.combiner = fit_combiner(self.member_proba(val.x), val.y, pooling, **kwargs)
        return self.combiner

    def predict_proba(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Ensemble class probabilities (float64 (N, C))."""
        return self.combiner(self.member_proba(x, batch_size))

    def evaluate(self, split: Split, batch_size: int = 1024) -> EvalReport:
        """Accuracy and log-loss of the ensemble on ``split``."""
        return evaluate_proba(self.predict_proba(split.x, batch_size), split.y)

    # -- persistence (no pickle: arrays + a JSON-able config) -------------------------------

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(config, arrays)``: config is JSON-able, arrays a flat dict of numpy arrays."""
        comb_cfg, comb_arrays = self.combiner.to_state()
        config = {
            "fl_model": self.fl_model.name,
            "num_classes": self.fl_model.num_classes,
            "activation_shape": list(self.fl_model.activation_shape),
            "overlays": {name: ov.name for name, ov in self.overlays.items()},
            "scaling": self.scaling,
            "blend_fl": self.blend_fl,
            "combiner": comb_cfg,
        }
        arrays = {f"fl/{k}": v for k, v in state_to_numpy(self.fl_model).items()}
        for name, ov in self.overlays.items():
            arrays.update({f"overlay/{name}/{k}": v for k, v in state_to_numpy(ov).items()})
        arrays.update({f"combiner/{k}": v for k, v in comb_arrays.items()})
        return config, arrays

    @classmethod
    def from_state(cls, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Ensemble:
        """Rebuild an ensemble from :meth:`to_state` output (raises on any mismatch)."""
        try:
            num_classes = int(config["num_classes"])
            fl = build_fl_model(str(config["fl_model"]), num_classes)
            load_numpy_state(fl, _prefixed(arrays, "fl/"))
            overlays = {}
            for name, kind in dict(config["overlays"]).items():
                ov = build_overlay_model(str(kind), fl.activation_shape, num_classes)
                load_numpy_state(ov, _prefixed(arrays, f"overlay/{name}/"))
                overlays[str(name)] = ov
            combiner = Combiner.from_state(config["combiner"], _prefixed(arrays, "combiner/"))
            return cls(
                fl,
                overlays,
                scaling=config["scaling"],
                blend_fl=bool(config["blend_fl"]),
                combiner=combiner,
            )
        except KeyError as exc:
            raise ConfigError(f"ensemble state lacks {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write to one ``.npz`` (config as JSON bytes in ``__config__``)."""
        config, arrays = self.to_state()
        blob = np.frombuffer(json.dumps(config, sort_keys=True).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **{"__config__": blob, **arrays})
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Ensemble:
        """Read a file written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(Path(path), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        blob = arrays.pop("__config__", None)
        if blob is None:
            raise ConfigError(f"{path}: not an ensemble file (no __config__)")
        return cls.from_state(json.loads(blob.tobytes().decode()), arrays)


def _prefixed(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
