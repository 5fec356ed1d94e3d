"""Typed message bodies: one frozen dataclass per message kind, validated where frames arrive.

Every codec frame a node receives carries a ``body`` dict. :meth:`from_body` turns it into
one of the dataclasses below or raises :class:`MessageError` with a short machine ``reason``
(``bad_type``, ``missing_field``, ``out_of_range``, ``non_finite``, ``bad_shape``,
``bad_dtype``, ``wrong_kind``, ``too_long``); nodes count rejections by kind and reason.
:meth:`to_body` builds the dict that goes on the wire: the bodies, and so the frames, are
exactly the ones the nodes built by hand before these classes existed.

What "valid" means depends on the run (the model's state keys and shapes, the number of
classes, the devices' shares of the data plan): it is passed in a :class:`Limits`, built
once per node from its configuration (:func:`emo_mqtt.nodes.base.limits_for`).

Pure: no asyncio, no MQTT, no torch. A torch tensor in a received body (SplitFed sends
them) is read through ``numpy.asarray``; one to be sent is passed through untouched, so its
wire origin is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from emo_mqtt.controller import ControlDecision
from emo_mqtt.errors import EmoError
from emo_mqtt.incarnation import is_incarnation
from emo_mqtt.topics import Kind

__all__ = [
    "MAX_ROUND",
    "Activations",
    "Control",
    "Done",
    "InferRequest",
    "InferResponse",
    "Limits",
    "MessageError",
    "OverlayModelMsg",
    "RoundAnnouncement",
    "SflActivations",
    "SflGradients",
    "StateSpec",
    "Update",
]

#: Rounds, batch indexes and versions are ints in ``[0, MAX_ROUND)``: bounded so that no
#: arithmetic on them overflows (a float ``inf`` or ``2**63`` is refused, not cast).
MAX_ROUND = 2**31
#: Longest id (device, overlay, request) accepted, in characters.
MAX_ID_LEN = 128
#: Array-valued fields of any kind: a model key map beyond this many entries is refused.
MAX_KEYS = 4096

#: ``{name: (shape, dtype)}`` of a model state, as :func:`StateSpec.of` builds it.
StateSpec = dict[str, tuple[tuple[int, ...], str]]


class MessageError(EmoError, ValueError):
    """A message body does not fit its kind; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def state_spec(state: Mapping[str, np.ndarray]) -> StateSpec:
    """The ``{name: (shape, dtype)}`` of a model state (numpy arrays)."""
    return {k: (tuple(int(d) for d in v.shape), np.dtype(v.dtype).str) for k, v in state.items()}


@dataclass(frozen=True)
class Limits:
    """What the receiving node knows a valid message looks like (all optional: None skips).

    - ``round_weights``: keys, shapes and dtypes of what ``server/round`` and updates carry
      (the whole FL model, or its trunk under SplitFed);
    - ``done_weights``: the whole FL model (``server/done``; SplitFed: its device half);
    - ``overlay_weights``: an overlay model's state;
    - ``activation_shape`` and ``num_classes``: activations and labels;
    - ``max_samples``: per device, the most samples an update may claim (its share of the
      data plan times the local epochs); ``default_max_samples`` for devices not listed;
    - ``max_sample_id``: sample ids are in ``[0, max_sample_id)``;
    - ``max_batch``: SplitFed batch indexes are in ``[0, max_batch)``; ``max_batch_size``
      bounds the rows of one SplitFed batch;
    - ``node_ids``: the ids a list of sampled devices may hold.
    """

    round_weights: StateSpec | None = None
    done_weights: StateSpec | None = None
    overlay_weights: StateSpec | None = None
    activation_shape: tuple[int, ...] | None = None
    num_classes: int = 10
    max_samples: Mapping[str, int] = field(default_factory=dict)
    default_max_samples: int | None = None
    max_sample_id: int | None = None
    max_batch: int | None = None
    max_batch_size: int | None = None
    node_ids: frozenset[str] | None = None
    max_images: int = 10_000

    def samples_cap(self, device: str | None) -> int | None:
        if device is not None and device in self.max_samples:
            return self.max_samples[device]
        return self.default_max_samples


# ------------------------------------------------------------------------------- checkers


def _get(body: Mapping[str, Any], name: str) -> Any:
    if not isinstance(body, Mapping):
        raise MessageError("bad_type", f"body is a {type(body).__name__}, not a map")
    if name not in body:
        raise MessageError("missing_field", name)
    return body[name]


def _int(value: Any, name: str, lo: int = 0, hi: int = MAX_ROUND) -> int:
    """An int in ``[lo, hi)``; bools, floats (inf included) and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise MessageError("bad_type", f"{name} is a {type(value).__name__}, not an int")
    v = int(value)
    if not lo <= v < hi:
        raise MessageError("out_of_range", f"{name} = {v} outside [{lo}, {hi})")
    return v


def _float(value: Any, name: str, *, allow_nan: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise MessageError("bad_type", f"{name} is a {type(value).__name__}, not a number")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float's range (10**400): as infinite as inf
        raise MessageError(
            "non_finite", f"{name}: an int of {int(value).bit_length()} bits"
        ) from None
    if math.isinf(v) or (math.isnan(v) and not allow_nan):
        raise MessageError("non_finite", f"{name} = {v}")
    return v


def _str(value: Any, name: str, max_len: int = MAX_ID_LEN) -> str:
    if not isinstance(value, str):
        raise MessageError("bad_type", f"{name} is a {type(value).__name__}, not a string")
    if len(value) > max_len:
        raise MessageError("too_long", f"{name}: {len(value)} characters > {max_len}")
    return value


def _array(value: Any, name: str) -> np.ndarray:
    """A numpy array (a torch tensor is viewed through ``numpy.asarray``)."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__name__ == "Tensor" and hasattr(value, "numpy"):
        try:
            return np.asarray(value.detach().numpy())
        except (TypeError, RuntimeError) as exc:  # bfloat16 has no numpy dtype
            raise MessageError("bad_dtype", f"{name}: {exc}") from exc
    raise MessageError("bad_type", f"{name} is a {type(value).__name__}, not an array")


def _floats(value: Any, name: str, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """A float array, every value finite, of ``shape`` (None: any size on that axis)."""
    arr = _array(value, name)
    if arr.dtype.kind != "f":
        raise MessageError("bad_dtype", f"{name}: dtype {arr.dtype}, expected floats")
    _shape(arr, name, shape)
    if arr.size and not np.isfinite(arr).all():
        raise MessageError("non_finite", f"{name}: non-finite values")
    return arr


def _ints(
    value: Any, name: str, shape: tuple[int | None, ...], lo: int, hi: int | None
) -> np.ndarray:
    arr = _array(value, name)
    if arr.dtype.kind not in "iu":
        raise MessageError("bad_dtype", f"{name}: dtype {arr.dtype}, expected ints")
    _shape(arr, name, shape)
    if arr.size:
        low, high = int(arr.min()), int(arr.max())
        if low < lo or (hi is not None and high >= hi):
            raise MessageError(
                "out_of_range", f"{name}: values in [{low}, {high}], expected [{lo}, {hi})"
            )
    return arr


def _shape(arr: np.ndarray, name: str, shape: tuple[int | None, ...] | None) -> None:
    if shape is None:
        return
    if arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)
    ):
        raise MessageError("bad_shape", f"{name}: shape {arr.shape}, expected {shape}")


def _state(value: Any, name: str, spec: StateSpec | None) -> dict[str, np.ndarray]:
    """A model state: the exact key set of ``spec``, each array of its shape and dtype."""
    if not isinstance(value, Mapping):
        raise MessageError("bad_type", f"{name} is a {type(value).__name__}, not a map")
    if len(value) > MAX_KEYS:
        raise MessageError("too_long", f"{name}: {len(value)} keys")
    out: dict[str, np.ndarray] = {}
    for key, item in value.items():
        arr = _array(item, f"{name}[{key!r}]")
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise MessageError("non_finite", f"{name}[{key!r}]: non-finite values")
        out[str(key)] = arr
    if spec is None:
        return out
    if set(out) != set(spec):
        missing = sorted(set(spec) - set(out))[:3]
        extra = sorted(set(out) - set(spec))[:3]
        raise MessageError("bad_shape", f"{name}: keys differ (missing {missing}, extra {extra})")
    for key, (shape, dtype) in spec.items():
        arr = out[key]
        if tuple(arr.shape) != shape:
            raise MessageError("bad_shape", f"{name}[{key!r}]: shape {arr.shape}, expected {shape}")
        if np.dtype(arr.dtype).str != dtype:
            raise MessageError(
                "bad_dtype", f"{name}[{key!r}]: dtype {arr.dtype}, expected {np.dtype(dtype)}"
            )
    # Keep the sender's key order: FedAvg checks the key order against its reference.
    return out


def _ids(value: Any, name: str, allowed: frozenset[str] | None, max_len: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise MessageError("bad_type", f"{name} is a {type(value).__name__}, not a list")
    if len(value) > max_len:
        raise MessageError("too_long", f"{name}: {len(value)} ids > {max_len}")
    ids = tuple(_str(v, name) for v in value)
    if allowed is not None and not set(ids) <= allowed:
        raise MessageError("out_of_range", f"{name}: unknown ids {sorted(set(ids) - allowed)[:3]}")
    if len(set(ids)) != len(ids):
        raise MessageError("out_of_range", f"{name}: duplicate ids")
    return ids


def _incarnation(body: Mapping[str, Any]) -> str:
    """The optional ``incarnation`` field (:mod:`emo_mqtt.incarnation`): ``""`` if absent
    (a sender from before incarnations), else an incarnation id."""
    value = body.get("incarnation", "") if isinstance(body, Mapping) else ""
    if not isinstance(value, str):
        raise MessageError("bad_type", f"incarnation is a {type(value).__name__}, not a string")
    if value and not is_incarnation(value):
        raise MessageError("bad_incarnation", f"incarnation {value[:40]!r}")
    return value


def _with_incarnation(body: dict[str, Any], incarnation: str) -> dict[str, Any]:
    """``body`` plus its incarnation when it has one (without, the frame is as it was)."""
    if incarnation:
        body["incarnation"] = incarnation
    return body


# ------------------------------------------------------------------------------- messages


class _Message:
    """Shared by the message classes: ``KIND`` is the envelope kind (``msg_kind``)."""

    KIND: ClassVar[str]


@dataclass(frozen=True)
class RoundAnnouncement(_Message):
    """``server/round``: the round, its sampled devices, deadline and device-side weights."""

    KIND: ClassVar[str] = "round"
    round: int
    algorithm: str
    sampled: tuple[str, ...]
    deadline_s: float
    weights: dict[str, np.ndarray]
    #: The server start that announced it (:mod:`emo_mqtt.incarnation`); "" if unknown.
    incarnation: str = ""

    def to_body(self) -> dict[str, Any]:
        body = {
            "round": self.round,
            "algorithm": self.algorithm,
            "sampled": list(self.sampled),
            "deadline_s": self.deadline_s,
            "weights": self.weights,
        }
        return _with_incarnation(body, self.incarnation)

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> RoundAnnouncement:
        n = len(limits.node_ids) if limits.node_ids is not None else 100_000
        deadline = _float(_get(body, "deadline_s"), "deadline_s")
        if deadline <= 0:
            raise MessageError("out_of_range", f"deadline_s = {deadline}")
        return cls(
            _int(_get(body, "round"), "round", 1),
            _str(_get(body, "algorithm"), "algorithm"),
            _ids(_get(body, "sampled"), "sampled", limits.node_ids, n),
            deadline,
            _state(_get(body, "weights"), "weights", limits.round_weights),
            _incarnation(body),
        )


@dataclass(frozen=True)
class Update(_Message):
    """``device/<id>/update``: a device's trained weights for a round."""

    KIND: ClassVar[str] = "update"
    round: int
    weights: dict[str, np.ndarray]
    samples: int
    #: Mean local training loss; NaN when unknown (SplitFed devices do not compute it).
    loss: float
    #: The incarnation of the round announcement it answers; "" if unknown.
    incarnation: str = ""

    def to_body(self) -> dict[str, Any]:
        body = {
            "round": self.round,
            "weights": self.weights,
            "samples": self.samples,
            "loss": self.loss,
        }
        return _with_incarnation(body, self.incarnation)

    @classmethod
    def from_body(
        cls, body: Mapping[str, Any], *, limits: Limits, sender: str | None = None
    ) -> Update:
        cap = limits.samples_cap(sender)
        samples = _int(_get(body, "samples"), "samples", 1, MAX_ROUND if cap is None else cap + 1)
        return cls(
            _int(_get(body, "round"), "round", 1),
            _state(_get(body, "weights"), "weights", limits.round_weights),
            samples,
            _float(_get(body, "loss"), "loss", allow_nan=True),
            _incarnation(body),
        )


@dataclass(frozen=True)
class Activations(_Message):
    """``device/<id>/activations``: one round's captured activations, in wire precision.

    ``data`` is (n, *activation_shape) float32, float16, or int8 codes with a float32
    per-sample ``scale``.
    """

    KIND: ClassVar[str] = "activations"
    round: int
    sample_ids: np.ndarray
    labels: np.ndarray
    data: np.ndarray
    scale: np.ndarray | None
    last: bool

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sample_ids": self.sample_ids,
            "labels": self.labels,
            "data": self.data,
            "scale": self.scale,
            "last": self.last,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> Activations:
        r = _int(_get(body, "round"), "round", 1)
        ids = _ints(_get(body, "sample_ids"), "sample_ids", (None,), 0, limits.max_sample_id)
        n = int(ids.shape[0])
        cap = limits.default_max_samples
        if cap is not None and n > cap:
            raise MessageError("too_long", f"{n} activations > {cap}")
        labels = _ints(_get(body, "labels"), "labels", (n,), 0, limits.num_classes)
        shape = limits.activation_shape
        want: tuple[int | None, ...] | None = None if shape is None else (n, *shape)
        data = _array(_get(body, "data"), "data")
        _shape(data, "data", want)
        if data.shape[:1] != (n,):
            raise MessageError("bad_shape", f"data: {data.shape[:1]} rows for {n} ids")
        raw_scale = _get(body, "scale")
        scale = None
        if data.dtype == np.int8:
            if raw_scale is None:
                raise MessageError("missing_field", "scale (int8 data)")
            scale = _floats(raw_scale, "scale", (n,))
            if scale.size and (scale <= 0).any():
                raise MessageError("out_of_range", "scale: values <= 0")
        elif data.dtype in (np.float32, np.float16):
            if raw_scale is not None:
                raise MessageError("bad_type", "scale given for float data")
            _floats(data, "data")
        else:
            raise MessageError("bad_dtype", f"data: dtype {data.dtype}")
        last = _get(body, "last")
        if not isinstance(last, bool):
            raise MessageError("bad_type", f"last is a {type(last).__name__}, not a bool")
        return cls(r, ids, labels, data, scale, last)


@dataclass(frozen=True)
class OverlayModelMsg(_Message):
    """``overlay/<id>/model``: a version of an overlay's model (floats travel as fp16)."""

    KIND: ClassVar[str] = "overlay.model"
    round: int
    version: int
    weights: dict[str, Any]
    loss: float
    entries: int

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "version": self.version,
            "weights": self.weights,
            "loss": self.loss,
            "entries": self.entries,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> OverlayModelMsg:
        """Non-finite weights (a poisoned model) raise ``non_finite``; a non-finite loss does
        too: a model whose own replay loss diverged is not one to ensemble."""
        return cls(
            _int(_get(body, "round"), "round", 0),
            _int(_get(body, "version"), "version", 0),
            _state(_get(body, "weights"), "weights", limits.overlay_weights),
            _float(_get(body, "loss"), "loss"),
            _int(_get(body, "entries"), "entries", 0),
        )


@dataclass(frozen=True)
class Control(_Message):
    """``device/<id>/control``: the controller's decision for a device and round."""

    KIND: ClassVar[str] = "control"
    round: int
    decision: ControlDecision
    incarnation: str = ""

    def to_body(self) -> dict[str, Any]:
        body = {"round": self.round, "decision": self.decision.to_dict()}
        return _with_incarnation(body, self.incarnation)

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> Control:
        del limits
        raw = _get(body, "decision")
        if not isinstance(raw, Mapping):
            raise MessageError("bad_type", "decision is not a map")
        fraction = _float(_get(raw, "fraction"), "decision.fraction")
        interval = _int(_get(raw, "interval"), "decision.interval", 1)
        precision = _str(_get(raw, "precision"), "decision.precision")
        reason = _str(raw.get("reason", ""), "decision.reason", 1024)
        try:
            decision = ControlDecision(fraction, precision, interval, reason)  # type: ignore[arg-type]
        except EmoError as exc:
            raise MessageError("out_of_range", str(exc)) from exc
        return cls(_int(_get(body, "round"), "round", 0), decision, _incarnation(body))


@dataclass(frozen=True)
class SflActivations(_Message):
    """``device/<id>/sfl/activations``: one SplitFed batch's cut-layer activations and labels."""

    KIND: ClassVar[str] = "sfl.activations"
    round: int
    batch: int
    #: numpy arrays when received; the sender's tensors (torch) when sent.
    activations: Any
    labels: Any

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "batch": self.batch,
            "activations": self.activations,
            "labels": self.labels,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> SflActivations:
        r = _int(_get(body, "round"), "round", 1)
        batch = _int(
            _get(body, "batch"),
            "batch",
            0,
            MAX_ROUND if limits.max_batch is None else limits.max_batch,
        )
        labels = _ints(_get(body, "labels"), "labels", (None,), 0, limits.num_classes)
        n = int(labels.shape[0])
        if n < 1 or (limits.max_batch_size is not None and n > limits.max_batch_size):
            raise MessageError("out_of_range", f"batch of {n} samples")
        shape = limits.activation_shape
        acts = _floats(
            _get(body, "activations"), "activations", None if shape is None else (n, *shape)
        )
        if acts.shape[:1] != (n,):
            raise MessageError("bad_shape", f"activations: {acts.shape[:1]} rows for {n} labels")
        return cls(r, batch, acts, labels)


@dataclass(frozen=True)
class SflGradients(_Message):
    """``device/<id>/sfl/gradients``: the gradient of one SplitFed batch's activations."""

    KIND: ClassVar[str] = "sfl.gradients"
    round: int
    batch: int
    gradient: Any
    incarnation: str = ""

    def to_body(self) -> dict[str, Any]:
        body = {"round": self.round, "batch": self.batch, "gradient": self.gradient}
        return _with_incarnation(body, self.incarnation)

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> SflGradients:
        shape = limits.activation_shape
        grad = _floats(
            _get(body, "gradient"), "gradient", None if shape is None else (None, *shape)
        )
        if limits.max_batch_size is not None and not 1 <= grad.shape[0] <= limits.max_batch_size:
            raise MessageError("out_of_range", f"gradient of {grad.shape[0]} rows")
        return cls(
            _int(_get(body, "round"), "round", 1),
            _int(
                _get(body, "batch"),
                "batch",
                0,
                MAX_ROUND if limits.max_batch is None else limits.max_batch,
            ),
            grad,
            _incarnation(body),
        )


@dataclass(frozen=True)
class Done(_Message):
    """``server/done``: the run is over; the final FL model."""

    KIND: ClassVar[str] = "done"
    round: int
    weights: dict[str, np.ndarray]
    reason: str
    incarnation: str = ""

    def to_body(self) -> dict[str, Any]:
        body = {"round": self.round, "weights": self.weights, "reason": self.reason}
        return _with_incarnation(body, self.incarnation)

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> Done:
        return cls(
            _int(_get(body, "round"), "round", 0),
            _state(_get(body, "weights"), "weights", limits.done_weights),
            _str(_get(body, "reason"), "reason", 1024),
            _incarnation(body),
        )


@dataclass(frozen=True)
class InferRequest(_Message):
    """``infer/<client>/request``: images to classify."""

    KIND: ClassVar[str] = "infer.request"
    request_id: str
    images: np.ndarray

    def to_body(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "images": self.images}

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> InferRequest:
        request_id = _str(_get(body, "request_id"), "request_id")
        images = _array(_get(body, "images"), "images")
        if images.dtype.kind not in "fiu":
            raise MessageError("bad_dtype", f"images: dtype {images.dtype}")
        if images.ndim == 0 or images.shape[0] > limits.max_images:
            raise MessageError("out_of_range", f"images: shape {images.shape}")
        if images.dtype.kind == "f" and images.size and not np.isfinite(images).all():
            raise MessageError("non_finite", "images: non-finite values")
        return cls(request_id, images)


@dataclass(frozen=True)
class InferResponse(_Message):
    """``infer/<client>/response``: class probabilities, or the reason of a refusal."""

    KIND: ClassVar[str] = "infer.response"
    request_id: str
    probs: np.ndarray | None = None
    error: str | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": self.request_id}
        if self.error is not None:
            body["error"] = self.error
        else:
            body["probs"] = self.probs
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, limits: Limits) -> InferResponse:
        request_id = _str(_get(body, "request_id"), "request_id")
        if "error" in body:
            return cls(request_id, None, _str(body["error"], "error", 4096))
        probs = _floats(_get(body, "probs"), "probs", (None, limits.num_classes))
        return cls(request_id, probs)


#: Every message class by its envelope kind.
MESSAGES: dict[str, type[_Message]] = {
    c.KIND: c
    for c in (
        RoundAnnouncement,
        Update,
        Activations,
        OverlayModelMsg,
        Control,
        SflActivations,
        SflGradients,
        Done,
        InferRequest,
        InferResponse,
    )
}


#: The message kind each topic carries (a frame of another kind on it is refused).
TOPIC_MESSAGES: dict[Kind, type[_Message]] = {
    Kind.SERVER_ROUND: RoundAnnouncement,
    Kind.DEVICE_UPDATE: Update,
    Kind.DEVICE_ACTIVATIONS: Activations,
    Kind.OVERLAY_MODEL: OverlayModelMsg,
    Kind.CONTROL: Control,
    Kind.DEVICE_SFL_ACTIVATIONS: SflActivations,
    Kind.SERVER_SFL_GRADIENTS: SflGradients,
    Kind.SERVER_DONE: Done,
    Kind.INFER_REQUEST: InferRequest,
    Kind.INFER_RESPONSE: InferResponse,
}


def check_kind(envelope_kind: Any, expected: str) -> None:
    """Raise ``wrong_kind`` unless a frame's ``msg_kind`` is the one its topic carries."""
    if envelope_kind != expected:
        raise MessageError(
            "wrong_kind", f"frame of kind {envelope_kind!r} where {expected!r} is expected"
        )
