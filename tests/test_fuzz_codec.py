"""Property tests: hostile bytes never escape as anything but CodecError / ChunkError.

Budgeted for CI on every push: the whole file runs in well under 20 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emo_mqtt.chunking import Reassembler, split
from emo_mqtt.codec import Envelope, decode, encode, int8
from emo_mqtt.errors import ChunkError, CodecError

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# A few valid frames covering every ext kind, used as seeds for mutation.
SEED_FRAMES = [
    encode({}, kind="control"),
    encode({"a": [1, -2, 3.5, "x", b"y", None, True], "m": {"n": {}}}, kind="update", seq=9),
    encode({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, kind="global", sender="s"),
    encode({"t": torch.arange(4, dtype=torch.bfloat16), "b": np.array([True, False])}, kind="a"),
    encode({"q": int8(np.linspace(-1, 1, 9)), "z": np.zeros((0, 2), np.int16)}, kind="a"),
]

NUMERIC_DTYPES = st.sampled_from(
    ["<f8", ">f8", "<f4", "<f2", "<i8", ">i4", "<i2", "i1", "u1", "<u2", "<u4", "<u8", "?"]
)


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes | bytearray]) -> bytes:
    """A valid frame with a few random bit flips, truncations, insertions or overwrites."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            chunk = draw(st.binary(min_size=1, max_size=9))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


@FUZZ
@given(st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: b"EMO\x02" + b))
def test_decode_random_bytes_raises_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode(data)


@FUZZ
@given(mutated(SEED_FRAMES))
def test_decode_mutated_frames_raises_only_codec_error(data: bytes) -> None:
    try:
        env = decode(data)
    except CodecError:
        return
    assert isinstance(env, Envelope) and isinstance(env.body, dict)


_BLOB = bytes(range(256)) * 2
CHUNK_SEEDS = [
    *split(b"", transfer_id=b"e" * 16),
    *split(_BLOB, chunk_size=1, transfer_id=b"1" * 16)[:3],
    *split(_BLOB, chunk_size=100, transfer_id=b"h" * 16),  # all 6: it can complete
    *split(_BLOB, chunk_size=257, transfer_id=b"h" * 16),  # same id, other split
]
chunk_frames = st.sampled_from(CHUNK_SEEDS) | mutated(CHUNK_SEEDS) | st.binary(max_size=80)


@FUZZ
@given(st.lists(chunk_frames, min_size=1, max_size=25))
def test_reassembler_raises_only_chunk_error_and_stays_bounded(frames: list[bytes]) -> None:
    r = Reassembler(max_bytes=4096, max_transfers=4, max_transfer_size=2048, timeout_s=1.0)
    for i, frame in enumerate(frames):
        try:
            out = r.feed(f"k{i % 2}", frame, i * 0.25)
        except ChunkError:
            out = None
        assert out is None or isinstance(out, bytes | bytearray)
        assert r.pending_bytes <= 4096 and r.pending_transfers <= 4
        r.expire(i * 0.25)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
arrays = NUMERIC_DTYPES.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
tensors = (
    st.sampled_from(["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "u1", "?"])
    .flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    )
    .map(lambda a: torch.from_numpy(a.copy()))
)
messages = st.recursive(
    scalars | arrays | tensors,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.shape == b.shape
        assert a.dtype.newbyteorder("<") == b.dtype.newbyteorder("<")
        assert a.astype(a.dtype.newbyteorder("<")).tobytes() == b.tobytes()  # bit-exact
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert a.numpy().tobytes() == b.numpy().tobytes()  # bit-exact, NaNs included
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=6), messages, max_size=4), st.integers(0, 2**40))
def test_roundtrip_property(body: dict[str, Any], seq: int) -> None:
    env = decode(encode(body, kind="update", sender="dev", run="run", seq=seq, time=5.0))
    assert (env.kind, env.sender, env.run, env.seq, env.time) == ("update", "dev", "run", seq, 5.0)
    assert_same(body, env.body)


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=50),
        elements=st.floats(-1e6, 1e6, width=32),
    )
)
def test_int8_error_bound_property(x: np.ndarray[Any, Any]) -> None:
    out = decode(encode({"x": int8(x)}, kind="k")).body["x"]
    assert out.dtype == np.float32 and out.shape == x.shape
    if x.size:
        peak = float(np.abs(x.astype(np.float64)).max())
        scale = peak / 127 if peak else 1.0
        err = np.abs(out.astype(np.float64) - x.astype(np.float64)).max()
        assert err <= scale / 2 + peak * 2**-23
