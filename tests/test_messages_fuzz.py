"""Property-based fuzz of every message kind at the validation layer (issue 11, item 8).

For each kind of :data:`emo_mqtt.messages.MESSAGES`, 10,000 bodies built from a valid one by
up to five mutations (a field set to junk: wrong types, NaN and infinities, huge and
negative ints, arrays of the wrong shape, dtype or content, nested junk; a field deleted;
unknown fields added; a nested map's entry replaced; the whole body replaced by a non-map).
Properties:

* ``from_body`` returns a message or raises :class:`MessageError` with a reason, never any
  other exception (an ``OverflowError`` or ``RecursionError`` here once ended a node's loop);
* whatever it accepts round-trips: ``to_body`` through the codec and ``from_body`` again
  gives the same body, and that second message is accepted too (so a node can relay it).

The unmutated seeds are the valid messages of tests/test_messages.py, so "valid bodies
round-trip" is covered by the examples with no mutation. Mutations are index draws into
fixed tables, derived from one drawn integer per case: cheap, so the 100,000 cases run in
well under a minute on a quiet machine.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_messages import LIMITS, good_messages, wire

from emo_mqtt.messages import MESSAGES, MessageError

CASES_PER_KIND = 10_000

FUZZ = settings(
    max_examples=CASES_PER_KIND,
    deadline=None,
    database=None,  # no example database on disk: every run draws fresh, nothing to clean
    suppress_health_check=[HealthCheck.too_slow],
)

NAN, INF = float("nan"), float("inf")


def _deep(n: int) -> list[Any]:
    """A list nested ``n`` deep, built without recursion."""
    out: list[Any] = []
    for _ in range(n):
        out = [out]
    return out


#: Values no field should take, and a few that some fields should (the boundaries).
JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**31 - 1,
    2**31,
    2**63,
    -(2**63),
    10**400,  # float(10**400) raises OverflowError
    0.0,
    0.5,
    -0.0,
    1e308,
    NAN,
    INF,
    -INF,
    "",
    "x",
    "x" * 5000,
    "dev00",
    b"\x00\xff",
    bytearray(b"ab"),
    [],
    [1],
    ["dev00", "dev00"],
    ["dev00", 1],
    {},
    {"a": 1},
    {1: 2},
    _deep(5000),
    {"k": _deep(50)},
    (1, 2),
    {1, 2},
    complex(1, 1),
    np.float64(NAN),
    np.float32(INF),
    np.int64(5),
    np.int64(-(2**63)),
    np.uint64(2**64 - 1),
    np.bool_(True),
    np.array(1.0, np.float32),
    np.array(3),
    np.zeros(0, np.float32),
    np.zeros((0, 4), np.float32),
    np.zeros((2, 0), np.float32),
    np.ones((2, 4), np.float32),
    np.ones((2, 4), np.float16),
    np.ones((2, 4), np.float64),
    np.full((2, 4), NAN, np.float32),
    np.full((2, 4), INF, np.float16),
    np.ones((2, 4), np.int8),
    np.ones((2, 4), np.bool_),
    np.ones((3, 2), np.float32),
    np.full((3, 2), NAN, np.float32),
    np.ones(3, np.float32),
    np.array([0, 1]),
    np.array([0, 1], np.uint8),
    np.array([0, 1000]),
    np.array([-1, 2]),
    np.array([2**62, 0]),
    np.array([2**64 - 1, 0], np.uint64),
    np.array([1.0, 2.0]),
    np.array([1.0, 0.0], np.float32),
    np.array([1.0, -1.0], np.float32),
    np.array([1 + 1j, 2]),
    np.array(["a", "b"]),
    np.array([None, 1], dtype=object),
    np.array(["2024-01-01"], dtype="datetime64[D]"),
    np.zeros((2, 1, 28, 28), np.float32),
    np.full((2, 10), 0.1),
    np.full((2, 10), NAN),
    np.ones((2, 4, 1, 1, 1, 1, 1), np.float32),
]

#: Field names of every kind, and some no kind has.
FIELDS = sorted({k for m in good_messages() for k in m.to_body()} | {"x", "", "Round"})

#: A case is one integer, the seed of the mutations (see :func:`mutations_of`): one
#: hypothesis draw per case. Drawing the mutations field by field cost 4x the time.
cases = st.integers(0, 2**64 - 1)

#: One mutation: (operation, field index, value index, integer, float).
Mutation = tuple[int, int, int, int, float]


def mutations_of(case: int) -> tuple[int, list[Mutation]]:
    """The seed body index and up to five mutations a case stands for (deterministic)."""
    rng = random.Random(case)
    ops: list[Mutation] = []
    for _ in range(rng.randrange(6)):
        # Ints: small, near the 2**31 and 2**63 bounds, or huge; floats: in [-2, 2), or any
        # 64-bit pattern (NaNs with payloads, infinities, subnormals).
        magnitude = rng.choice((4, 8, 31, 32, 63, 64, 400))
        i = rng.getrandbits(magnitude) * rng.choice((1, -1))
        x = (
            rng.uniform(-2, 2)
            if rng.random() < 0.5
            else struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        )
        ops.append((rng.randrange(6), rng.randrange(len(FIELDS)), rng.randrange(len(JUNK)), i, x))
    return rng.randrange(8), ops


def mutate(body: Mapping[str, Any], ops: list[Mutation]) -> Any:
    """``body`` with the mutations applied (each op copies what it changes)."""
    out: Any = dict(body)
    for op, f, j, i, x in ops:
        if not isinstance(out, dict):
            break
        keys = sorted(out) or FIELDS
        name = keys[f % len(keys)]
        if op == 0:  # a field set to junk
            out[name] = JUNK[j]
        elif op == 1:  # a field set to any int (ranges, overflow)
            out[name] = i
        elif op == 2:  # a field set to any float (NaN, infinities, subnormals)
            out[name] = x
        elif op == 3:  # a field deleted, or a field of another kind added
            if f % 2:
                out.pop(name, None)
            else:
                out[FIELDS[f]] = JUNK[j]
        elif op == 4:  # inside a nested map (weights, decision): an entry replaced or added
            inner = out.get(name)
            if isinstance(inner, Mapping):
                inner = dict(inner)
                inner_keys = sorted(inner, key=str) or ["w"]
                inner[inner_keys[i % len(inner_keys)] if i % 3 else FIELDS[f]] = JUNK[j]
                out[name] = inner
            else:
                out[name] = [JUNK[j]]
        else:  # the whole body is not a map
            out = JUNK[j] if not isinstance(JUNK[j], dict) else [out]
    return out


def same(a: Any, b: Any) -> bool:
    """Deep equality of bodies: arrays by dtype, shape and values (NaN equal to NaN)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b) and type(a) is type(b)


SEEDS: dict[str, list[dict[str, Any]]] = {}
for _msg in good_messages():
    SEEDS.setdefault(_msg.KIND, []).append(wire(_msg.to_body()))


def test_every_kind_has_a_seed() -> None:
    assert set(SEEDS) == set(MESSAGES)


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_fuzz_from_body_accepts_or_refuses_with_a_reason(kind: str) -> None:
    cls: Any = MESSAGES[kind]
    seeds = SEEDS[kind]
    # A fuzz that never reached acceptance, or never refused, would prove little.
    counts = {"accepted": 0, "refused": 0}

    @FUZZ
    @given(case=cases)
    def check(case: int) -> None:
        seed, ops = mutations_of(case)
        body = mutate(seeds[seed % len(seeds)], ops)
        try:
            msg = cls.from_body(body, limits=LIMITS)
        except MessageError as exc:
            assert exc.reason and isinstance(exc.reason, str)
            counts["refused"] += 1
            return
        counts["accepted"] += 1
        assert type(msg) is cls
        sent = msg.to_body()
        again = cls.from_body(wire(sent), limits=LIMITS)
        assert same(again.to_body(), sent), (sent, again.to_body())

    check()
    assert counts["accepted"] > 0 and counts["refused"] > 0, counts
    assert counts["accepted"] + counts["refused"] >= CASES_PER_KIND, counts
