"""Tests for emo_mqtt.codec: exact round trips, lossy bounds, and refusal of bad input."""

from __future__ import annotations

import math
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from emo_mqtt.codec import (
    EXT_LOSSY,
    EXT_TENSOR,
    MAGIC,
    VERSION,
    Envelope,
    Lossy,
    decode,
    encode,
    fp16,
    int8,
    is_codec_frame,
    payload_nbytes,
)
from emo_mqtt.errors import CodecError

NP_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]
TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4)]


def roundtrip(value: Any) -> Any:
    return decode(encode({"v": value}, kind="test")).body["v"]


def np_bits(a: np.ndarray[Any, Any]) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def torch_bits(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def make_np(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype is np.bool_:
        raw = raw % 2
    # Random bit patterns: for floats this includes NaNs with payloads, infs, -0.0.
    out: np.ndarray[Any, Any] = raw.view(dtype).reshape(shape)
    return out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_roundtrip_is_bit_exact(dtype: Any, shape: tuple[int, ...]) -> None:
    a = make_np(dtype, shape)
    b = roundtrip(a)
    assert isinstance(b, np.ndarray)
    assert b.dtype == a.dtype and b.shape == a.shape
    assert np_bits(b) == np_bits(a)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_roundtrip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    src = make_np(np.bool_ if dtype == torch.bool else np.uint8, (*shape, 1))
    raw = torch.from_numpy(src.copy()).reshape(shape)
    width = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        t = raw
    else:
        t = torch.from_numpy(make_np(np.uint8, (*shape, width))).view(dtype).reshape(shape)
    b = roundtrip(t)
    assert isinstance(b, torch.Tensor)
    assert b.dtype == t.dtype and b.shape == t.shape and b.device.type == "cpu"
    assert torch_bits(b) == torch_bits(t)


def test_special_float_values_survive() -> None:
    nan_payload = np.array([0x7FF8_0000_DEAD_BEEF], dtype=np.uint64).view(np.float64)
    a = np.concatenate([nan_payload, [-0.0, 0.0, np.inf, -np.inf, 5e-324, np.finfo(float).max]])
    assert np_bits(roundtrip(a)) == np_bits(a)
    t = torch.from_numpy(a[:-1].astype(np.float32))  # float64 max would overflow float32
    assert torch_bits(roundtrip(t)) == torch_bits(t)
    assert math.copysign(1.0, float(roundtrip(np.array(-0.0)))) == -1.0


def test_non_contiguous_and_big_endian_numpy() -> None:
    base = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    for view in (base[:, ::2, 1:], base.T, base[::-1], np.asfortranarray(base)):
        out = roundtrip(view)
        assert out.shape == view.shape and np.array_equal(out, view)
        assert out.flags.c_contiguous
    be = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    out = roundtrip(be)
    assert out.dtype == np.dtype("<i4")  # normalised to little-endian, values identical
    assert np.array_equal(out, be)
    be_float = np.array([1.5, -2.25, np.nan], dtype=">f8")
    assert np_bits(roundtrip(be_float)) == np_bits(be_float.astype("<f8"))


def test_non_contiguous_torch_grad_and_param() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()[1:, ::2]
    assert torch.equal(roundtrip(t), t)
    g = torch.randn(3, 3, requires_grad=True) * 2
    out = roundtrip(g)
    assert not out.requires_grad and torch.equal(out, g.detach())
    p = torch.nn.Parameter(torch.randn(5))
    assert type(roundtrip(p)) is torch.Tensor


def test_decoded_numpy_is_read_only_view_and_torch_is_writable() -> None:
    a = roundtrip(np.ones(10, dtype=np.float32))
    assert not a.flags.writeable
    assert a.ctypes.data % 8 == 0  # padding keeps the data aligned
    t = roundtrip(torch.ones(10))
    t += 1  # own, writable memory
    assert torch.equal(t, torch.full((10,), 2.0))


def test_decoded_numpy_is_a_zero_copy_view_of_the_frame() -> None:
    src = {"a": np.arange(5, dtype=np.int16), "b": np.arange(3.0), "c": np.ones((2, 2), "u1")}
    for frame in (encode(src, kind="k"), bytearray(encode(src, kind="k"))):
        whole = np.frombuffer(frame, np.uint8)
        body = decode(frame).body
        for name, value in src.items():
            out = body[name]
            assert np.array_equal(out, value) and np.shares_memory(out, whole)
            # Read-only even over a mutable buffer, and aligned for its dtype.
            assert not out.flags.writeable and out.flags.aligned
    # A caller's misaligned buffer gets an aligned copy rather than a slow view.
    frame = encode({"b": np.arange(3.0)}, kind="k")
    shifted = memoryview(bytearray(b"\x00" + frame))[1:]
    out = decode(shifted).body["b"]
    assert out.flags.aligned and not out.flags.writeable and out.tolist() == [0.0, 1.0, 2.0]


def test_tensor_bytes_travel_after_the_msgpack_map() -> None:
    t = np.arange(4, dtype="<u4")
    frame = encode({"x": np.arange(3, dtype="u1"), "t": t}, kind="k")
    (meta_len,) = struct.unpack_from("<I", frame, 4)
    data_start = 8 + meta_len + (-(8 + meta_len) % 8)
    assert frame[data_start:] == bytes([0, 1, 2]) + bytes(5) + t.tobytes()


def test_nested_structures_and_scalars() -> None:
    msg: dict[str, Any] = {
        "none": None,
        "flags": [True, False],
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
        "floats": [0.5, -0.0, math.inf],
        "text": "héllo",
        "blob": b"\x00\x01",
        "tuple": (1, "two", np.arange(3)),
        "deep": {"a": [{"b": [torch.ones(2), {"c": np.zeros((2, 2), np.int8)}]}]},
        "np_scalars": [np.float32(1.5), np.int64(7), np.bool_(True)],
        "empty": {"list": [], "dict": {}},
    }
    body = decode(encode(msg, kind="update")).body
    assert body["none"] is None and body["flags"] == [True, False]
    assert body["ints"] == msg["ints"] and body["text"] == "héllo" and body["blob"] == b"\x00\x01"
    assert body["floats"][2] == math.inf and math.copysign(1, body["floats"][1]) == -1
    assert isinstance(body["tuple"], list) and body["tuple"][:2] == [1, "two"]
    assert np.array_equal(body["tuple"][2], np.arange(3))
    inner = body["deep"]["a"][0]["b"]
    assert torch.equal(inner[0], torch.ones(2)) and inner[1]["c"].dtype == np.int8
    assert body["np_scalars"] == [1.5, 7, True]
    assert body["empty"] == {"list": [], "dict": {}}


def test_envelope_fields() -> None:
    before = time.time()
    env = decode(encode({"x": 1}, kind="global", sender="srv", run="r1", seq=42))
    assert env == Envelope("global", "srv", "r1", 42, env.time, {"x": 1}, VERSION)
    assert before <= env.time <= time.time()
    env = decode(encode({}, kind="control", time=1234.5))
    assert (env.kind, env.sender, env.run, env.seq, env.time, env.body) == (
        "control",
        "",
        "",
        0,
        1234.5,
        {},
    )


def test_frame_prefix_and_helpers() -> None:
    frame = encode({"a": np.zeros(4, np.float32)}, kind="k")
    assert frame[:4] == MAGIC + bytes([VERSION])
    assert is_codec_frame(frame) and is_codec_frame(memoryview(frame))
    assert not is_codec_frame(b"EMC\x01....") and not is_codec_frame(b"EM")
    assert decode(bytearray(frame)).body["a"].shape == (4,)
    assert decode(memoryview(frame)).body["a"].shape == (4,)
    msg = {"a": np.zeros(4, np.float32), "b": [torch.zeros(3, dtype=torch.float64)]}
    msg["c"] = fp16(np.zeros(10))
    msg["d"] = int8(torch.zeros(10))
    assert payload_nbytes(msg) == 16 + 24 + 20 + 10


# --------------------------------------------------------------------------- lossy


@pytest.mark.parametrize(
    ("origin", "dtype"),
    [("numpy", d) for d in ("float32", "float64", "float16")]
    + [("torch", d) for d in ("float32", "float64", "float16", "bfloat16")],
)
def test_lossy_restores_dtype_and_origin(origin: str, dtype: str) -> None:
    rng = np.random.default_rng(1)
    x64 = rng.standard_normal((4, 5)) * 3
    x: Any = torch.from_numpy(x64).to(getattr(torch, dtype)) if origin == "torch" else x64
    if origin == "numpy":
        x = x64.astype(dtype)
    for wrap in (fp16, int8):
        out = roundtrip(wrap(x))
        assert type(out) is type(x) and out.dtype == x.dtype and out.shape == x.shape
        ref = np.asarray(x.float() if origin == "torch" else x, dtype=np.float64)
        got = np.asarray(out.float() if origin == "torch" else out, dtype=np.float64)
        if wrap is fp16:
            assert np.allclose(got, ref, rtol=1e-3, atol=1e-3)
        else:
            scale = np.abs(ref).max() / 127
            tol = scale / 2 + np.abs(ref).max() * (
                2e-2 if dtype in ("float16", "bfloat16") else 1e-6
            )
            assert np.abs(got - ref).max() <= tol


def test_int8_error_bound_and_edge_cases() -> None:
    x = np.random.default_rng(2).standard_normal(10_000) * 10
    out = roundtrip(int8(x))
    scale = np.abs(x).max() / 127
    assert np.abs(out - x).max() <= scale / 2 + 1e-12
    assert np.array_equal(roundtrip(int8(np.zeros(5))), np.zeros(5))
    assert roundtrip(int8(np.zeros((0, 3)))).shape == (0, 3)
    assert roundtrip(int8(np.array(-4.0))) == -4.0
    frame = encode({"x": int8(x)}, kind="k")
    assert len(frame) < x.nbytes / 7  # 1 byte per element on the wire


def test_fp16_keeps_nonfinite_and_refuses_overflow() -> None:
    x = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    out = roundtrip(fp16(x))
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf and out.dtype == np.float32
    with pytest.raises(CodecError, match=r"body\['x'\]: value exceeds the float16 range"):
        encode({"x": fp16(np.array([1e6]))}, kind="k")


def test_lossy_refusals() -> None:
    with pytest.raises(CodecError, match="needs finite values"):
        encode({"x": int8(np.array([1.0, np.nan]))}, kind="k")
    with pytest.raises(CodecError, match="needs finite values"):
        encode({"x": int8(torch.tensor([math.inf]))}, kind="k")
    with pytest.raises(CodecError, match=r"body\['x'\]: lossy int8 needs a float tensor"):
        encode({"x": int8(np.arange(3))}, kind="k")
    with pytest.raises(CodecError, match="needs a float tensor"):
        encode({"x": fp16(torch.arange(3))}, kind="k")
    with pytest.raises(CodecError, match="unknown lossy encoding"):
        Lossy(np.zeros(2), "int4")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="numpy array or torch tensor"):
        Lossy([1.0, 2.0], "fp16")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"weights": [1, 2, 3, {4}]}, r"body\['weights'\]\[3\]: unsupported type set"),
        ({"a": {"b": [1, 2j]}}, r"body\['a'\]\['b'\]\[1\]: unsupported type complex"),
        ({"a": {1: "x"}}, r"body\['a'\]: dict key 1 is int, keys must be str"),
        ({"o": object()}, r"body\['o'\]: unsupported type object"),
        ({"n": 2**64}, r"body\['n'\]: cannot pack int"),
        ({"n": [1, 2, -(2**64)]}, r"body\['n'\]\[2\]: cannot pack int"),
        ({"a": np.array(["x"])}, r"body\['a'\]: unsupported dtype <U1"),
        ({"a": np.zeros(2, np.complex64)}, r"body\['a'\]: unsupported dtype complex64"),
        ({"a": np.array([None], dtype=object)}, r"body\['a'\]: unsupported dtype object"),
        ({"a": torch.zeros(2, dtype=torch.complex64)}, r"unsupported dtype torch.complex64"),
        ({"a": torch.zeros(3).to_sparse()}, r"body\['a'\]: unsupported tensor layout"),
    ],
)
def test_encode_errors_name_the_path(message: dict[str, Any], expected: str) -> None:
    with pytest.raises(CodecError, match=expected):
        encode(message, kind="update")


def test_encode_rejects_bad_envelope_arguments() -> None:
    with pytest.raises(CodecError, match="mapping"):
        encode([1, 2], kind="k")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=r"body: dict key 3"):
        encode({3: 1}, kind="k")  # type: ignore[dict-item]
    with pytest.raises(CodecError, match="kind"):
        encode({}, kind="")
    with pytest.raises(CodecError, match="sender"):
        encode({}, kind="k", sender=1)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="seq"):
        encode({}, kind="k", seq=True)
    with pytest.raises(CodecError, match="time"):
        encode({}, kind="k", time=math.nan)


def test_encode_rejects_too_deep_nesting() -> None:
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    with pytest.raises(CodecError, match="nested deeper"):
        encode({"d": deep}, kind="k")


# --------------------------------------------------------------------------- decode errors


def raw_meta(meta: bytes, data: bytes = b"", version: int = VERSION) -> bytes:
    """A frame built by hand: prefix, the msgpack bytes ``meta``, padding, data section."""
    head = MAGIC + bytes([version]) + struct.pack("<I", len(meta)) + meta
    return head + bytes(-len(head) % 8) + data


def raw_frame(obj: Any, data: bytes = b"", version: int = VERSION) -> bytes:
    return raw_meta(msgpack.packb(obj, use_bin_type=True), data, version)


def envelope(body: Any = None, **override: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"k": "u", "s": "", "r": "", "q": 0, "t": 1.0, "b": body or {}}
    env.update(override)
    return {k: v for k, v in env.items() if v is not ...}


def tensor_ext(
    origin: int = 0, code: int = 2, dims: tuple[int, ...] = (2,), offset: int = 0
) -> msgpack.ExtType:
    head = struct.pack("<BBB5xQ", origin, code, len(dims), offset)
    return msgpack.ExtType(EXT_TENSOR, head + struct.pack(f"<{len(dims)}Q", *dims))


def lossy_ext(enc: int = 2, code: int = 2, scale: float = 1.0, n: int = 2) -> Any:
    head = struct.pack("<BBBB4xdQQ", 0, enc, code, 1, scale, 0, n)
    return msgpack.ExtType(EXT_LOSSY, head)


def test_valid_hand_built_frames_decode() -> None:
    # Guards the helpers below: the same builders with sane values do decode.
    body = decode(raw_frame(envelope({"t": tensor_ext()}), bytes(8))).body
    assert body["t"].tolist() == [0.0, 0.0]
    body = decode(raw_frame(envelope({"l": lossy_ext()}), bytes(2))).body
    assert body["l"].tolist() == [0.0, 0.0]
    two = envelope({"a": tensor_ext(code=9, dims=(3,)), "b": tensor_ext(dims=(1,), offset=8)})
    body = decode(raw_frame(two, b"abc" + bytes(5) + bytes(4))).body
    assert bytes(body["a"]) == b"abc" and body["b"].tolist() == [0.0]


TENSOR_AT_0 = envelope({"x": tensor_ext()})

MALFORMED = [
    (b"", "bad magic"),
    (b"EMO", "bad magic"),
    (b"XYZ\x02\x80", "bad magic"),
    (b"EMO\x03\x80", r"unsupported codec version 3; this build supports \[2\]"),
    (b"EMO\x01\x80", "unsupported codec version 1"),
    (b"EMO\x00\x80", "unsupported codec version 0"),
    (b"EMO\x02", "prefix truncated"),
    (b"EMO\x02\x01\x00\x00\x00\xc1\x00\x00\x00", "malformed codec frame"),
    (b"EMO\x02\xff\xff\xff\xff\x80", r"the msgpack map and its padding need 4294967304"),
    (raw_frame(envelope())[:-1] + b"\x01", "malformed codec frame"),  # padding must be zero
    (raw_frame(envelope()) + b"\x00", "1 bytes after the last tensor"),
    (raw_frame(envelope(), b"\x00" * 8), "8 bytes after the last tensor"),
    (raw_frame([1, 2]), "envelope is list"),
    (raw_frame(envelope(k=...)), r"lacks field\(s\) \['k'\]"),
    (raw_frame(envelope(k=3)), "field 'k' is int"),
    (raw_frame(envelope(s=None)), "field 's' is NoneType"),
    (raw_frame(envelope(q=1.5)), "field 'q'"),
    (raw_frame(envelope(q=True)), "field 'q'"),
    (raw_frame(envelope(t="now")), "field 't'"),
    (raw_frame(envelope(b=[1])), "field 'b'"),
    (raw_frame(envelope({"x": msgpack.ExtType(9, b"abc")})), "unknown ext type code 9"),
    # A msgpack timestamp ext (-1) of an invalid length (1 byte).
    (raw_meta(msgpack.packb(envelope({"x": 0}))[:-1] + b"\xd4\xff\x00"), "malformed codec"),
    # Bytes after the msgpack map but inside its declared length.
    (raw_meta(msgpack.packb(envelope()) + b"\x00"), "ExtraData"),
    (raw_frame({b"k": 1}), "map key of type bytes"),
    (raw_frame(envelope({"x": {1: 2}})), "malformed codec frame"),
    (raw_frame(envelope({"x": tensor_ext(code=99)}), bytes(8)), "unknown dtype code 99"),
    (raw_frame(envelope({"x": tensor_ext(origin=7)}), bytes(8)), "bad origin 7"),
    (raw_frame(TENSOR_AT_0, bytes(7)), "needs 8 data bytes, frame has 7"),
    (raw_frame(envelope({"x": tensor_ext(dims=(3,))}), bytes(8)), "needs 12 data bytes, frame"),
    (raw_frame(TENSOR_AT_0, bytes(9)), "1 bytes after the last tensor"),
    (raw_frame(envelope({"x": tensor_ext(offset=8)}), bytes(16)), "offset 8, expected 0"),
    # Two descriptors may not alias the same bytes, nor leave a gap, nor hide bytes in it.
    (raw_frame(envelope({"x": tensor_ext(), "y": tensor_ext()}), bytes(16)), "expected 8"),
    (raw_frame(envelope({"x": tensor_ext(), "y": tensor_ext(offset=16)}), bytes(24)), "expec"),
    (
        raw_frame(
            envelope({"x": tensor_ext(code=9), "y": tensor_ext(code=9, offset=8)}),
            bytes(2) + b"\x01" + bytes(7),
        ),
        "non-zero padding",
    ),
    (raw_frame(envelope({"x": tensor_ext(dims=(1,) * 33)})), "ndim 33 exceeds 32"),
    (raw_frame(envelope({"x": tensor_ext(dims=(0, 2**62))})), "absurdly large"),
    (
        raw_frame(envelope({"x": tensor_ext(code=4)}), bytes(4)),
        "bfloat16 is only valid for torch",
    ),
    (raw_frame(envelope({"x": tensor_ext(code=10)}), b"\x00\x02"), "bool bytes"),
    (raw_frame(envelope({"x": msgpack.ExtType(EXT_TENSOR, b"\x00\x02")})), "truncated"),
    (
        raw_frame(envelope({"x": msgpack.ExtType(EXT_TENSOR, tensor_ext().data + b"\x00")})),
        "descriptor of 25 bytes for 1 dims",
    ),
    (raw_frame(envelope({"x": lossy_ext(enc=5)}), bytes(2)), "unknown encoding 5"),
    (raw_frame(envelope({"x": lossy_ext(code=5)}), bytes(2)), "bad original dtype code 5"),
    (raw_frame(envelope({"x": lossy_ext(scale=math.nan)}), bytes(2)), "bad int8 scale"),
    (raw_frame(envelope({"x": lossy_ext(scale=0.0)}), bytes(2)), "bad int8 scale"),
    (raw_frame(envelope({"x": lossy_ext()}), bytes(1)), "needs 2 data bytes, frame has 1"),
    (raw_frame(envelope({"x": msgpack.ExtType(EXT_LOSSY, bytes(23))})), "truncated"),
]


@pytest.mark.parametrize(("data", "expected"), MALFORMED, ids=[e for _, e in MALFORMED])
def test_decode_rejects_malformed(data: bytes, expected: str) -> None:
    with pytest.raises(CodecError, match=expected):
        decode(data)


def test_foreign_msgpack_timestamp_decodes_as_float() -> None:
    body = decode(raw_frame(envelope({"x": [msgpack.Timestamp(1, 500_000_000)]}))).body
    assert body == {"x": [1.5]}


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(CodecError, match="bytes-like"):
        decode("EMO\x01")  # type: ignore[arg-type]


def test_decode_truncated_at_every_position() -> None:
    frame = encode(
        {"a": np.arange(5, dtype=np.float32), "b": [1, "x", {"c": int8(np.ones(3))}]}, kind="k"
    )
    for cut in range(len(frame)):
        with pytest.raises(CodecError):
            decode(frame[:cut])


def test_absurd_declared_size_fails_fast_without_allocating() -> None:
    frame = raw_frame(envelope({"x": tensor_ext(dims=(2**60,))}))
    assert len(frame) < 80
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CodecError, match=r"declared shape \(1152921504606846976,\) is absurdl"):
            decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20 and time.perf_counter() - start < 0.5


def test_forged_msgpack_lengths_are_bounded_by_input() -> None:
    # A map header declaring 2**32-1 entries, an array and a bin declaring 4 GiB.
    for forged in (b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
        tracemalloc.start()
        try:
            with pytest.raises(CodecError):
                decode(raw_meta(forged))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2**20
