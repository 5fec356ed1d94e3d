"""emo_mqtt.telemetry: untrusted status and metrics JSON, parsed under limits."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_mqtt.errors import CodecError, EmoError, TelemetryError
from emo_mqtt.telemetry import (
    MAX_DEPTH,
    REASONS,
    check_event,
    parse_metrics,
    parse_object,
    parse_status,
)


def reason(payload: bytes | str, **kwargs: Any) -> str:
    with pytest.raises(TelemetryError) as caught:
        parse_object(payload, **kwargs)
    assert caught.value.reason in REASONS
    return caught.value.reason


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def test_deep_nesting_is_refused_without_recursion() -> None:
    for depth in (33, 1000, 5000, 100_000):
        assert reason('{"a": ' + nested(depth - 1) + "}") == "too_deep"
        assert reason(nested(depth, '{"k":', "}").replace("}", "1}", 1)) == "too_deep"
    assert parse_object('{"a": ' + nested(MAX_DEPTH - 1) + "}")["a"] is not None
    assert reason('{"a": ' + nested(4) + "}", max_depth=4) == "too_deep"
    # Brackets inside strings are text, escaped quotes and backslashes included.
    text = json.dumps({"s": "[" * 100 + '\\"{' * 50, "t": "\\", "u": ["]]]"]})
    assert parse_object(text)["t"] == "\\"


def test_what_is_refused_and_why() -> None:
    assert reason(b"[1]") == "not_object"
    assert reason(b'"a string"') == "not_object"
    assert reason(b"null") == "not_object"
    assert reason(b"{not json") == "bad_json"
    assert reason(b'{"a": "unterminated') == "bad_json"
    assert reason(b'{"a": 1}{') == "bad_json"
    assert reason(b"\xff\xfe{}") == "not_utf8"
    assert reason(b"{}" + b" " * 100, max_bytes=64) == "too_large"
    assert reason('{"n": ' + "9" * 5000 + "}") == "bad_json"  # int digit limit
    assert issubclass(TelemetryError, CodecError) and issubclass(TelemetryError, ValueError)


def test_non_finite_numbers_become_none() -> None:
    body = parse_object(b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e999, "e": 1.5}')
    assert body == {"a": None, "b": None, "c": None, "d": None, "e": 1.5}


def test_known_fields_are_type_checked() -> None:
    good = {
        "round": 3,
        "accuracy": 0.5,
        "fl_accuracy": None,
        "bytes_out": 10,
        "final": False,
        "rejected": {"duplicate": 2},
        "event": "round",
        "wall_s": 1.5,
        "whatever": [1],
    }
    assert parse_metrics(json.dumps(good)) == good
    for field, value in [
        ("round", -1),
        ("round", 1.5),
        ("round", True),
        ("round", "3"),
        ("accuracy", "high"),
        ("bytes_out", -5),
        ("final", 1),
        ("rejected", {"x": -1}),
        ("rejected", [1]),
        ("event", 7),
        ("bytes_out_by_kind", {"w": 1.5}),
        ("cache", []),
    ]:
        with pytest.raises(TelemetryError) as caught:
            parse_metrics(json.dumps({**good, field: value}))
        assert caught.value.reason == "bad_field", (field, value)
    assert parse_status(b'{"state": "online", "round": 0, "version": "0.1"}')["state"]
    with pytest.raises(TelemetryError, match="version"):
        parse_status(b'{"state": "online", "version": 2}')


def test_events_need_their_fields() -> None:
    check_event({"event": "round", "round": 1, "accuracy": 0.5, "fl_accuracy": 0.5, "wall_s": 1.0})
    check_event({"event": "something else"})
    check_event({"event": ["not", "a", "string"]})
    check_event({})
    for body in (
        {"event": "round", "round": 1, "accuracy": 0.5, "fl_accuracy": 0.5},
        {"event": "done", "accuracy": None, "fl_accuracy": 0.5, "fl_model_sha256": "ab"},
    ):
        with pytest.raises(TelemetryError) as caught:
            check_event(body)
        assert caught.value.reason == "missing_field"


# ----------------------------------------------------------------- properties

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=60,
)


def depth_of(value: Any) -> int:
    """Nesting depth as the parser counts it: a list or object is one level."""
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.text(max_size=5), json_values, max_size=5), st.integers(1, 40), st.booleans()
)
def test_parses_what_json_dumps_unless_too_deep(
    body: dict[str, Any], max_depth: int, ascii_only: bool
) -> None:
    text = json.dumps(body, ensure_ascii=ascii_only)
    if depth_of(body) > max_depth:
        assert reason(text, max_depth=max_depth) == "too_deep"
    else:
        assert parse_object(text.encode(), max_depth=max_depth) == body


# Fragments that stress the scanner: brackets, quotes, escapes, deep runs.
fragments = st.sampled_from(
    [
        "[",
        "]",
        "{",
        "}",
        '"',
        "\\",
        '\\"',
        "\\\\",
        ",",
        ":",
        "1",
        "null",
        '"k":',
        "[" * 40,
        "]" * 40,
        '{"a":' * 40,
        "NaN",
        " ",
    ]
)


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.lists(fragments, max_size=60).map("".join),
        st.text(max_size=200),
        st.binary(max_size=200),
    )
)
def test_any_input_raises_only_telemetry_error_and_agrees_with_json(
    payload: str | bytes,
) -> None:
    try:
        body = parse_object(payload)
    except TelemetryError as exc:
        assert exc.reason in REASONS
        return
    except EmoError as exc:  # pragma: no cover - a failure to report
        raise AssertionError(f"not a TelemetryError: {exc!r}") from exc
    assert isinstance(body, dict) and depth_of(body) <= MAX_DEPTH
    expected = json.loads(
        payload,
        parse_constant=lambda _: None,
        parse_float=lambda t: float(t) if math.isfinite(float(t)) else None,
    )
    assert json.dumps(body, sort_keys=True) == json.dumps(expected, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(MAX_DEPTH + 1, 20_000),
    st.sampled_from(["[]", "{}", "[{"]),
    st.text(alphabet='"\\ab', max_size=8),
)
def test_deep_nesting_never_recurses(depth: int, kind: str, noise: str) -> None:
    opens = "".join(('{"k":' if kind[i % len(kind)] == "{" else "[") for i in range(depth))
    text = '{"x": ' + opens + json.dumps(noise)
    # Whether closed or not, valid or not: refused, and never a RecursionError.
    assert reason(text) in {"too_deep", "bad_json"}
