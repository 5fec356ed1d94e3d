"""The FL model (trunk + head, split at the cut layer) and the larger overlay models.

Sizes (10 classes, 1x28x28 inputs; ``python -m emo_mqtt.models`` prints them). Every FL model
also takes other image shapes, named after its registry name: ``cnn-small@3x32x32`` is
``cnn-small`` for CIFAR-10 (conv(3->8,5) first, a cut layer of 8x14x14, linear(400->10)); the
overlays follow from the cut layer they are given.

- ``cnn-small`` FL model, 5,994 parameters: conv(1->8,5)-relu-pool | conv(8->16,5)-relu-pool-
  linear(256->10). The cut is after the first conv block: the trunk (208 parameters) is what
  every device, overlay and SplitFed server shares; the cut layer is 8x12x12 = 1,152 floats
  per sample (4.5 KiB fp32, 1.2 KiB int8).
- ``cnn-small-late``: the same network cut after the second block (trunk 3,424 parameters,
  head linear(256->10)); cut layer 16x4x4 = 256 floats, 4.5x less traffic, but the overlays
  then see features already pooled down for a linear head and add less (docs/algorithms.md).
- ``mlp-small``: linear(784->64)-relu | linear(64->10); cut layer 64; 50,890 parameters.
- ``overlay-mlp`` (horizontal scaling, wide): layernorm-linear(D->512)-relu-linear(512->256)-
  relu-linear(256->10) on the flattened cut layer: 726,538 parameters on cnn-small's cut
  (121x the FL model), 265,994 on cnn-small-late's (44x).
- ``overlay-cnn`` (vertical scaling, deeper, stacked on the trunk): on an 8x12x12 cut,
  conv(8->32,3)-bn-relu-pool-conv(32->64,3)-bn-relu-pool-linear(576->128)-relu-linear(128->10):
  96,170 parameters (16x); on a 4x4 cut, three 3x3 convs (64, 64, 128)-avgpool-linear:
  121,866 (20x).

SplitFed's model (``build_split_model``) is an FL model's trunk with an overlay model as its
head (the server half): ``cnn-small`` + ``overlay-mlp`` is 208 device-side parameters and
726,538 server-side.

The FL models hold no dropout and no batch norm on purpose: their training must be a pure
function of (weights, data order), so that capturing activations cannot change a bit of it,
and FedAvg of batch-norm statistics across non-IID devices is a known failure mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from emo_mqtt.data import split_model_name
from emo_mqtt.errors import ConfigError, StateError

__all__ = [
    "FL_MODELS",
    "OVERLAY_MODELS",
    "FLModel",
    "OverlayModel",
    "StateError",
    "build_fl_model",
    "build_overlay_model",
    "build_split_model",
    "load_numpy_state",
    "param_count",
    "state_to_numpy",
]


class FLModel(nn.Module):
    """The device model ``forward(x) = head(trunk(x))``; ``trunk(x)`` is the cut layer.

    ``activation_shape`` is the per-sample shape of ``trunk(x)``; ``name`` is the registry name
    the model was built from (so it can be rebuilt from a saved config).
    """

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module,
        activation_shape: tuple[int, ...],
        name: str,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.activation_shape = tuple(activation_shape)
        self.name = name
        self.num_classes = num_classes
        #: Per-sample input shape (C, H, W).
        self.input_shape: tuple[int, int, int] = (1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.trunk(x))
        return out


class OverlayModel(nn.Module):
    """An overlay model: cut-layer activations (N, *activation_shape) -> logits (N, classes).

    Accepts activations flattened to (N, prod(activation_shape)) as well, since caches store
    them flat.
    """

    def __init__(self, body: nn.Module, activation_shape: tuple[int, ...], name: str) -> None:
        super().__init__()
        self.body = body
        self.activation_shape = tuple(activation_shape)
        self.name = name

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = a.reshape(a.shape[0], *self.activation_shape)
        out: torch.Tensor = self.body(a)
        return out


Shape = tuple[int, int, int]


def _conv_out(size: int, name: str, shape: Shape, blocks: int) -> int:
    """The side of the map after ``blocks`` conv(5)-pool(2) blocks; ConfigError if it vanishes."""
    for _ in range(blocks):
        size = (size - 4) // 2
        if size < 1:
            raise ConfigError(f"{name}: input {shape} is too small for its 5x5 convolutions")
    return size


def _cnn_small_late(num_classes: int, shape: Shape) -> FLModel:
    channels, height, width = shape
    h, w = (_conv_out(d, "cnn-small-late", shape, 2) for d in (height, width))
    trunk = nn.Sequential(
        nn.Conv2d(channels, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    head = nn.Sequential(nn.Flatten(), nn.Linear(16 * h * w, num_classes))
    return FLModel(trunk, head, (16, h, w), "cnn-small-late", num_classes)


def _cnn_small(num_classes: int, shape: Shape) -> FLModel:
    channels, height, width = shape
    h1, w1 = (_conv_out(d, "cnn-small", shape, 1) for d in (height, width))
    h2, w2 = (_conv_out(d, "cnn-small", shape, 2) for d in (height, width))
    trunk = nn.Sequential(nn.Conv2d(channels, 8, 5), nn.ReLU(), nn.MaxPool2d(2))
    head = nn.Sequential(
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h2 * w2, num_classes),
    )
    return FLModel(trunk, head, (8, h1, w1), "cnn-small", num_classes)


def _mlp_small(num_classes: int, shape: Shape) -> FLModel:
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 64), nn.ReLU())
    head = nn.Linear(64, num_classes)
    return FLModel(trunk, head, (64,), "mlp-small", num_classes)


#: Builders by registry name, from (num_classes, input shape (C, H, W)).
FL_MODELS: dict[str, Callable[[int, Shape], FLModel]] = {
    "cnn-small": _cnn_small,
    "cnn-small-late": _cnn_small_late,
    "mlp-small": _mlp_small,
}


def build_fl_model(name: str = "cnn-small", num_classes: int = 10) -> FLModel:
    """A fresh FL model from the registry; initialised from torch's global RNG (seed first).

    ``name`` is a registry name, optionally with the input shape it is built for:
    ``"cnn-small"`` takes Fashion-MNIST's 1x28x28 images, ``"cnn-small@3x32x32"`` CIFAR-10's
    (see :func:`emo_mqtt.data.split_model_name`). For 1x28x28 the layers, and so the
    initial weights for a seed, are those the registry has always built. The model keeps the
    full name, so that a saved model is rebuilt for the same input.
    """
    base, shape = split_model_name(name)
    if base not in FL_MODELS:
        raise ConfigError(f"unknown FL model {base!r}; known: {', '.join(sorted(FL_MODELS))}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    model = FL_MODELS[base](num_classes, shape)
    model.name = name
    model.input_shape = shape
    return model


def _overlay_mlp(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    dim = math.prod(shape)
    # LayerNorm first: the trunk's activation scale drifts from round to round, and the
    # overlay trains on a mix of rounds; normalising per sample absorbs most of that shift.
    return nn.Sequential(
        nn.Flatten(),
        nn.LayerNorm(dim),
        nn.Linear(dim, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def _overlay_cnn(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(shape) != 3:
        raise ConfigError(f"overlay-cnn needs a (C, H, W) cut layer, got {shape}")
    channels, height, width = shape
    if min(height, width) >= 8:
        # Large maps (an early cut): the conv layers a device cannot afford, then a wide
        # classifier; this is vertical scaling proper.
        flat = 64 * (height // 4) * (width // 4)
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


OVERLAY_MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "overlay-mlp": _overlay_mlp,
    "overlay-cnn": _overlay_cnn,
}


def build_overlay_model(
    name: str, activation_shape: tuple[int, ...] | list[int], num_classes: int = 10
) -> OverlayModel:
    """A fresh overlay model for cut-layer activations of ``activation_shape``."""
    if name not in OVERLAY_MODELS:
        known = ", ".join(sorted(OVERLAY_MODELS))
        raise ConfigError(f"unknown overlay model {name!r}; known: {known}")
    shape = tuple(int(d) for d in activation_shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"bad activation shape {activation_shape!r}")
    return OverlayModel(OVERLAY_MODELS[name](shape, num_classes), shape, name)


def build_split_model(name: str, server_half: str, num_classes: int = 10) -> FLModel:
    """SplitFed's large model: the FL model's trunk (device half) under an overlay model.

    The server half is the overlay model ``server_half`` (the scenario's
    ``emo.overlay_model``) on the trunk's cut layer: the same large model EMO's overlays
    train, stacked vertically, so that SplitFed trains what it exists to train (a model the
    devices cannot hold) rather than the FL model's small head. Built from torch's global
    RNG: the trunk first, exactly as :func:`build_fl_model` builds it for the same seed, then
    the server half.
    """
    model = build_fl_model(name, num_classes)
    model.head = build_overlay_model(server_half, model.activation_shape, num_classes)
    return model


def param_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's state dict as numpy copies, in ``state_dict`` order (deterministic).

    Floating tensors become float32; integer buffers (batch-norm counters) keep their dtype.
    """
    out: dict[str, np.ndarray] = {}
    for key, tensor in module.state_dict().items():
        t = tensor.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[key] = t.numpy().copy()
    return out


def load_numpy_state(module: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load ``state`` (as made by :func:`state_to_numpy`) into ``module``, in place.

    Raises :class:`StateError` unless keys, shapes and dtypes all match exactly; nothing is
    loaded in that case.
    """
    current = module.state_dict()
    missing = [k for k in current if k not in state]
    extra = [k for k in state if k not in current]
    if missing or extra:
        raise StateError(f"state keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    for key, ref in current.items():
        arr = np.asarray(state[key])
        want = np.dtype(np.float32) if ref.is_floating_point() else ref.numpy().dtype
        if tuple(arr.shape) != tuple(ref.shape):
            raise StateError(f"{key}: shape {arr.shape}, model has {tuple(ref.shape)}")
        if arr.dtype != want:
            raise StateError(f"{key}: dtype {arr.dtype}, model wants {want}")
        tensors[key] = torch.from_numpy(np.array(arr, copy=True)).to(ref.dtype)
    module.load_state_dict(tensors, strict=True)


def _describe() -> str:
    lines = []
    for name in FL_MODELS:
        fl = build_fl_model(name)
        lines.append(f"{name}: {param_count(fl)} params, cut layer {fl.activation_shape}")
        for oname in OVERLAY_MODELS:
            try:
                ov = build_overlay_model(oname, fl.activation_shape)
            except ConfigError:
                continue
            ratio = param_count(ov) / param_count(fl)
            lines.append(f"  {oname}: {param_count(ov)} params ({ratio:.1f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_describe())
