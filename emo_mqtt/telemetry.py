"""Parse the fleet's JSON telemetry (status and metrics) as untrusted input.

Anyone allowed to write a status or metrics topic (every device, over its own id) can put
anything there, retained: JSON nested 5,000 deep (the standard parser recurses and raises
``RecursionError``), a list, ``NaN``, a string where a number belongs. Whoever reads
telemetry (``emo run``'s monitor, the dashboard, the server's view of who is online) must
skip such a message, count it, and carry on. This module is that one place:

* :func:`parse_object` decodes a payload into a JSON object under hard limits (size,
  nesting depth, finite numbers) without recursing on the input: the depth is measured by
  a linear scan before the standard parser ever sees the text;
* :func:`parse_status` and :func:`parse_metrics` also check the types of the fields we
  know (:data:`STATUS_FIELDS`, :data:`METRICS_FIELDS`), so a consumer can use them
  without guarding each access, and :func:`check_event` that a round or done event
  carries what a summary needs. Unknown fields are kept as they are.

Every refusal is a :class:`~emo_mqtt.errors.TelemetryError` whose ``reason`` is one of
:data:`REASONS`, for counting. The module is pure: no I/O, no asyncio.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import Any

from emo_mqtt.errors import TelemetryError

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "METRICS_FIELDS",
    "REASONS",
    "REQUIRED_BY_EVENT",
    "STATUS_FIELDS",
    "check_event",
    "check_fields",
    "parse_metrics",
    "parse_object",
    "parse_status",
]

#: Deepest nesting accepted: our own telemetry nests three levels at most.
MAX_DEPTH = 32
#: Largest payload accepted (bytes): our own metrics are a few kB.
MAX_BYTES = 1 << 20
#: Every ``TelemetryError.reason`` this module raises.
REASONS = frozenset(
    {"too_large", "not_utf8", "bad_json", "too_deep", "not_object", "bad_field", "missing_field"}
)

# A JSON string, loosened (any escape, any character, or running to the end of the text
# unterminated): possessive, so it matches at every quote in linear time, never backtracks.
_STRING = re.compile(r'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth_check(text: str, max_depth: int) -> None:
    """Raise ``too_deep`` if brackets outside strings nest deeper than ``max_depth``.

    Linear and in C but for one pass over the brackets: strings are cut out, then
    everything but brackets, and the depth is the largest running sum. Strings are cut
    with JSON's string syntax loosened, so the scan can only disagree with the parser
    where the parser fails anyway, after the point where the two agree: it never lets
    deep nesting through.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if len(brackets) > max_depth and max(accumulate(map(_STEP.__getitem__, brackets))) > max_depth:
        raise TelemetryError(f"nested deeper than {max_depth} levels", "too_deep")


def _no_constant(name: str) -> None:
    del name  # NaN, Infinity, -Infinity: not JSON; what a browser's JSON would make of them
    return None


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None  # 1e999 parses as inf


def parse_object(
    payload: bytes | bytearray | memoryview | str,
    *,
    max_depth: int = MAX_DEPTH,
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """Decode one JSON object from ``payload`` under limits; :class:`TelemetryError` if not.

    Refused: more than ``max_bytes`` bytes (``too_large``), invalid UTF-8 (``not_utf8``),
    invalid JSON (``bad_json``), nesting deeper than ``max_depth`` (``too_deep``),
    anything but an object at the top (``not_object``). ``NaN``, ``Infinity`` and numbers
    that overflow to infinity become ``None``: every number returned is finite. Never
    raises anything else, never recurses on the input.
    """
    if len(payload) > max_bytes:
        raise TelemetryError(f"{len(payload)} bytes > {max_bytes}", "too_large")
    if isinstance(payload, str):
        text = payload
    else:
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TelemetryError(f"not UTF-8: {exc}", "not_utf8") from exc
    _depth_check(text, max_depth)
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        # RecursionError cannot happen after the depth check; kept as a last line.
        raise TelemetryError(f"invalid JSON: {exc}", "bad_json") from exc
    if not isinstance(body, dict):
        raise TelemetryError(f"a JSON {type(body).__name__}, not an object", "not_object")
    return body


# -- field types ---------------------------------------------------------------------------
Check = Callable[[Any], bool]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    # parse_object only lets finite floats through; a caller's own dict may hold others.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_count(v) for v in value.values())


def _or_none(check: Check) -> Check:
    return lambda value: value is None or check(value)


#: Known fields of ``telemetry/status/<role>/<id>`` and their types (checked when present).
STATUS_FIELDS: Mapping[str, Check] = {
    "state": _is_str,
    "role": _is_str,
    "id": _is_str,
    "run": _is_str,
    "version": _is_str,
    "round": _is_count,
    "time": _is_number,
    "incarnation": _is_str,
}

#: Known fields of ``telemetry/metrics/<role>/<id>`` that consumers read, and their types.
METRICS_FIELDS: Mapping[str, Check] = {
    "role": _is_str,
    "id": _is_str,
    "run": _is_str,
    "algorithm": _is_str,
    "event": _is_str,
    "fl_model_sha256": _is_str,
    "round": _is_count,
    "rounds": _is_count,
    "updates": _is_count,
    "reconnects": _is_count,
    "bytes_out": _is_count,
    "bytes_in": _is_count,
    "messages_out": _is_count,
    "messages_in": _is_count,
    "activation_bytes": _is_count,
    "time": _is_number,
    "uptime_s": _is_number,
    "wall_s": _is_number,
    "train_wall_s": _is_number,
    "accuracy": _or_none(_is_number),
    "fl_accuracy": _or_none(_is_number),
    "loss": _or_none(_is_number),
    "final": _is_bool,
    "bytes_out_by_kind": _is_counts,
    "bytes_in_by_kind": _is_counts,
    "rejected": _is_counts,
    "cache": _is_object,
    "decision": _is_object,
}

#: Fields a metrics message must carry (not None) for its ``event``: what ``emo run``'s
#: summary and the dashboard's charts are built from.
REQUIRED_BY_EVENT: Mapping[str, tuple[str, ...]] = {
    "round": ("round", "accuracy", "fl_accuracy", "wall_s"),
    "done": ("accuracy", "fl_accuracy", "fl_model_sha256"),
}


def check_fields(body: Mapping[str, Any], fields: Mapping[str, Check]) -> None:
    """Raise ``bad_field`` if a known field of ``body`` has the wrong type."""
    for name, check in fields.items():
        if name in body and not check(body[name]):
            raise TelemetryError(
                f"field {name!r} has a wrong type or range: {str(body[name])[:40]!r}",
                "bad_field",
            )


def parse_status(payload: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    """A status object with its known fields type-checked (see :func:`parse_object`)."""
    body = parse_object(payload)
    check_fields(body, STATUS_FIELDS)
    return body


def parse_metrics(payload: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    """A metrics object with its known fields type-checked (see :func:`parse_object`)."""
    body = parse_object(payload)
    check_fields(body, METRICS_FIELDS)
    return body


#: States of ``telemetry/run`` (see :meth:`nodes.server.ServerNode.run_state_body`).
RUN_STATES = ("starting", "live", "finished", "interrupted")

#: Known fields of ``telemetry/run`` and their types.
RUN_STATE_FIELDS: Mapping[str, Check] = {
    "state": lambda v: v in RUN_STATES,
    "run": _is_str,
    "algorithm": _is_str,
    "incarnation": _is_str,
    "controller": _is_bool,
    "overlays": _is_bool,
    "round": _is_count,
    "closed": _is_count,
    "rounds": _is_count,
    "sampled": lambda v: isinstance(v, list) and all(_is_str(x) for x in v),
    "history": lambda v: isinstance(v, list) and all(_is_object(x) for x in v),
    "final": _or_none(_is_object),
    "layout": lambda v: (
        _is_object(v)
        and all(isinstance(ids, list) and all(_is_str(x) for x in ids) for ids in v.values())
    ),
    "time": _is_number,
}


def parse_run_state(payload: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    """A run-state object with its known fields type-checked (see :func:`parse_object`)."""
    body = parse_object(payload)
    check_fields(body, RUN_STATE_FIELDS)
    return body


def check_event(body: Mapping[str, Any]) -> None:
    """Raise ``missing_field`` unless ``body`` carries (not None) what its ``event`` needs
    (:data:`REQUIRED_BY_EVENT`): what ``emo run``'s summary is built from."""
    event = body.get("event")
    for name in REQUIRED_BY_EVENT.get(event if isinstance(event, str) else "", ()):
        if body.get(name) is None:
            raise TelemetryError(f"event {event!r} without {name!r}", "missing_field")


def progress_line(algorithm: str, rounds: int, body: Mapping[str, Any], bytes_so_far: int) -> str:
    """The progress line of a closed round, as ``emo run`` and a standalone server print it.

    ``body``: the server's ``round`` event (``round``, ``accuracy``, ``fl_accuracy``,
    ``updates``, ``wall_s``); ``bytes_so_far``: bytes published so far (as far as known).
    """
    line = f"[{algorithm:>7}] round {body['round']:>3}/{rounds}  acc {body['accuracy']:.4f}"
    if body["accuracy"] != body["fl_accuracy"]:
        line += f" (FL model {body['fl_accuracy']:.4f})"
    line += f"  updates {body.get('updates')}  {bytes_so_far / 1e6:8.2f} MB  "
    return line + f"{body['wall_s']:7.1f} s"
