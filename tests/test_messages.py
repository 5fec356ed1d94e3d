"""Typed messages: every kind round-trips, and bad bodies fail with a counted reason."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_mqtt.codec import decode, encode, fp16
from emo_mqtt.controller import ControlDecision
from emo_mqtt.messages import (
    MESSAGES,
    TOPIC_MESSAGES,
    Activations,
    Control,
    Done,
    InferRequest,
    InferResponse,
    Limits,
    MessageError,
    OverlayModelMsg,
    RoundAnnouncement,
    SflActivations,
    SflGradients,
    Update,
    check_kind,
    state_spec,
)

STATE: dict[str, np.ndarray[Any, Any]] = {
    "w": np.ones((3, 2), np.float32),
    "b": np.zeros(3, np.float32),
    "n": np.array(1, np.int64),
}
SPEC = state_spec(STATE)
LIMITS = Limits(
    round_weights=SPEC,
    done_weights=SPEC,
    overlay_weights=SPEC,
    activation_shape=(4,),
    num_classes=10,
    max_samples={"dev00": 100},
    default_max_samples=200,
    max_sample_id=100,
    max_batch=10,
    max_batch_size=8,
    node_ids=frozenset({"dev00", "dev01"}),
)


def wire(body: dict[str, Any]) -> dict[str, Any]:
    """The body as a receiver sees it: through the codec."""
    return decode(encode(body, kind="x")).body


def reason(cls: Any, body: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(MessageError) as info:
        cls.from_body(wire(body), limits=LIMITS, **kw)
    return info.value.reason


def good_messages() -> list[Any]:
    acts = np.ones((2, 4), np.float32)
    return [
        RoundAnnouncement(1, "fl", ("dev00",), 60.0, STATE),
        Update(2, STATE, 50, 0.5),
        Update(2, STATE, 50, float("nan")),
        Activations(1, np.array([0, 5]), np.array([1, 9]), acts, None, True),
        Activations(
            1,
            np.array([0, 5]),
            np.array([1, 9]),
            acts.astype(np.int8),
            np.ones(2, np.float32),
            False,
        ),
        OverlayModelMsg(
            3, 2, {k: fp16(v) if v.dtype.kind == "f" else v for k, v in STATE.items()}, 1.5, 40
        ),
        Control(2, ControlDecision(0.5, "int8", 2, "drift")),
        SflActivations(1, 3, acts, np.array([0, 1])),
        SflGradients(1, 3, acts),
        Done(4, STATE, "finished"),
        InferRequest("r1", np.zeros((2, 1, 28, 28), np.float32)),
        InferResponse("r1", np.full((2, 10), 0.1)),
        InferResponse("r1", None, "no"),
    ]


@pytest.mark.parametrize("msg", good_messages(), ids=lambda m: type(m).__name__)
def test_every_kind_round_trips(msg: Any) -> None:
    body = wire(msg.to_body())
    back = type(msg).from_body(body, limits=LIMITS)
    assert type(back) is type(msg)
    assert back.to_body().keys() == msg.to_body().keys()
    assert MESSAGES[msg.KIND] is type(msg)


def test_topics_name_their_kind() -> None:
    assert {c.KIND for c in TOPIC_MESSAGES.values()} == set(MESSAGES)
    check_kind("update", "update")
    with pytest.raises(MessageError) as info:
        check_kind("round", "update")
    assert info.value.reason == "wrong_kind"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (float("inf"), "bad_type"),
        (2**63, "out_of_range"),
        (True, "bad_type"),
        ("1", "bad_type"),
        (-1, "out_of_range"),
        (0, "out_of_range"),
        (1.0, "bad_type"),
        (None, "bad_type"),
    ],
)
def test_rounds_are_bounded_ints(value: Any, why: str) -> None:
    assert reason(Update, {"round": value, "weights": STATE, "samples": 5, "loss": 0.1}) == why


def test_updates() -> None:
    body = {"round": 1, "weights": STATE, "samples": 5, "loss": 0.1}
    assert reason(Update, {**body, "samples": 0}) == "out_of_range"
    assert reason(Update, {**body, "samples": 10**15}) == "out_of_range"
    # Above the device's share of the data plan times the epochs.
    assert reason(Update, {**body, "samples": 101}, sender="dev00") == "out_of_range"
    Update.from_body(wire({**body, "samples": 150}), limits=LIMITS, sender="dev01")
    assert reason(Update, {**body, "loss": float("inf")}) == "non_finite"
    assert reason(Update, {k: v for k, v in body.items() if k != "weights"}) == "missing_field"
    nan = {**STATE, "w": np.full((3, 2), np.nan, np.float32)}
    assert reason(Update, {**body, "weights": nan}) == "non_finite"
    assert (
        reason(Update, {**body, "weights": {**STATE, "w": np.ones((2, 3), np.float32)}})
        == "bad_shape"
    )
    assert reason(Update, {**body, "weights": {**STATE, "w": np.ones((3, 2))}}) == "bad_dtype"
    assert reason(Update, {**body, "weights": {"w": STATE["w"]}}) == "bad_shape"
    assert reason(Update, {**body, "weights": [1, 2]}) == "bad_type"


def test_activations() -> None:
    body = {
        "round": 1,
        "sample_ids": np.array([0, 1]),
        "labels": np.array([1, 2]),
        "data": np.ones((2, 4), np.float32),
        "scale": None,
        "last": True,
    }
    assert reason(Activations, {**body, "labels": np.array([1, 1000])}) == "out_of_range"
    assert reason(Activations, {**body, "labels": np.array([1, -1])}) == "out_of_range"
    assert reason(Activations, {**body, "labels": np.array([1.0, 2.0])}) == "bad_dtype"
    assert reason(Activations, {**body, "sample_ids": np.array([0, 100])}) == "out_of_range"
    assert reason(Activations, {**body, "data": np.ones((2, 5), np.float32)}) == "bad_shape"
    assert reason(Activations, {**body, "data": np.ones((3, 4), np.float32)}) == "bad_shape"
    assert (
        reason(Activations, {**body, "data": np.full((2, 4), np.nan, np.float32)}) == "non_finite"
    )
    assert reason(Activations, {**body, "data": np.ones((2, 4), np.int8)}) == "missing_field"
    assert (
        reason(
            Activations,
            {
                **body,
                "data": np.ones((2, 4), np.int8),
                "scale": np.array([1.0, np.inf], np.float32),
            },
        )
        == "non_finite"
    )
    assert reason(Activations, {**body, "round": 2**63}) == "out_of_range"
    assert reason(Activations, {**body, "last": 1}) == "bad_type"
    many = np.arange(201) % 100
    assert (
        reason(
            Activations,
            {
                **body,
                "sample_ids": many,
                "labels": many % 10,
                "data": np.ones((201, 4), np.float32),
            },
        )
        == "too_long"
    )


def test_overlay_models_and_splitfed() -> None:
    poisoned = {**STATE, "w": np.full((3, 2), np.nan, np.float32)}
    body = {"round": 1, "version": 1, "weights": poisoned, "loss": 1.0, "entries": 3}
    assert reason(OverlayModelMsg, body) == "non_finite"
    assert reason(OverlayModelMsg, {**body, "weights": STATE, "loss": float("nan")}) == "non_finite"
    sfl = {
        "round": 1,
        "batch": 0,
        "activations": np.ones((2, 4), np.float32),
        "labels": np.array([0, 1]),
    }
    assert (
        reason(SflActivations, {**sfl, "activations": np.ones((2, 5), np.float32)}) == "bad_shape"
    )
    assert (
        reason(SflActivations, {**sfl, "activations": np.full((2, 4), np.inf, np.float32)})
        == "non_finite"
    )
    assert reason(SflActivations, {**sfl, "batch": 10}) == "out_of_range"
    assert reason(SflActivations, {**sfl, "labels": np.arange(9)}) == "out_of_range"
    assert (
        reason(
            Control, {"round": 1, "decision": {"fraction": 2.0, "precision": "int8", "interval": 1}}
        )
        == "out_of_range"
    )
    assert (
        reason(
            Control, {"round": 1, "decision": {"fraction": 0.5, "precision": "int4", "interval": 1}}
        )
        == "out_of_range"
    )
    assert (
        reason(
            RoundAnnouncement,
            {
                "round": 1,
                "algorithm": "fl",
                "sampled": ["dev09"],
                "deadline_s": 1.0,
                "weights": STATE,
            },
        )
        == "out_of_range"
    )


def test_torch_tensors_are_read_as_arrays() -> None:
    torch = pytest.importorskip("torch")
    body = wire(
        {"round": 1, "batch": 0, "activations": torch.ones(2, 4), "labels": torch.tensor([0, 1])}
    )
    msg = SflActivations.from_body(body, limits=LIMITS)
    assert isinstance(msg.activations, np.ndarray) and msg.activations.shape == (2, 4)


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
fields = st.sampled_from(
    [
        "round",
        "weights",
        "samples",
        "loss",
        "sample_ids",
        "labels",
        "data",
        "scale",
        "last",
        "version",
        "entries",
        "decision",
        "batch",
        "activations",
        "gradient",
        "reason",
        "request_id",
        "images",
        "probs",
        "sampled",
        "algorithm",
        "deadline_s",
        "error",
    ]
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(MESSAGES)), body=st.dictionaries(fields, values, max_size=8))
def test_any_body_is_accepted_or_refused_with_a_reason(kind: str, body: dict[str, Any]) -> None:
    """Fuzz: whatever the body, from_body returns or raises MessageError, nothing else."""
    try:
        MESSAGES[kind].from_body(body, limits=LIMITS)  # type: ignore[attr-defined]
    except MessageError as exc:
        assert exc.reason
