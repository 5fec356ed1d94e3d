"""The emo-mqtt wire codec: msgpack envelopes carrying numpy arrays and torch tensors.

A frame is ``MAGIC + bytes([VERSION])`` followed by one msgpack map::

    {"k": kind, "s": sender, "r": run, "q": seq, "t": time, "b": body}

``body`` may hold msgpack-native values (None, bool, int, float, str, bytes, lists, tuples
and dicts with str keys), numpy arrays, torch tensors and :class:`Lossy` wrappers, nested
arbitrarily. Tensors travel as msgpack ExtTypes whose payload is a small fixed header
followed by the raw little-endian C-order bytes, so a round trip is bit-exact (NaN
payloads, -0.0, 0-d and zero-size tensors included).

Tensor ext payload (``EXT_TENSOR``)::

    u8 origin (0 numpy, 1 torch) | u8 dtype code | u8 ndim | 5 zero bytes
    | ndim x u64 dims | data

Lossy ext payload (``EXT_LOSSY``)::

    u8 origin | u8 encoding (1 fp16, 2 int8) | u8 original dtype code | u8 ndim
    | 4 zero bytes | f64 scale | ndim x u64 dims | data (float16 or int8)

Both headers are multiples of 8 bytes so the data that follows stays 8-byte aligned inside
the ext payload, which lets decode hand out an aligned zero-copy numpy view.

The module is pure: no I/O, no asyncio, no pickle. torch is imported only when a torch
tensor is encoded (it must already be imported by the caller then) or decoded.
"""

from __future__ import annotations

import math
import struct
import sys
import threading
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgpack
import numpy as np

from emo_mqtt.errors import CodecError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAGIC",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "Envelope",
    "Lossy",
    "decode",
    "encode",
    "fp16",
    "int8",
    "is_codec_frame",
    "payload_nbytes",
]

MAGIC = b"EMO"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

EXT_TENSOR = 1
EXT_LOSSY = 2

#: Deepest nesting encode accepts. msgpack's C unpacker gives up at 1024 levels; staying
#: well below it means every frame we produce can also be decoded.
MAX_DEPTH = 256
#: Most dimensions a decoded tensor may declare (torch and numpy both cap near 64).
MAX_NDIM = 32

_ORIGIN_NUMPY = 0
_ORIGIN_TORCH = 1
_ENC_FP16 = 1
_ENC_INT8 = 2
_ENCODINGS = {"fp16": _ENC_FP16, "int8": _ENC_INT8}

_TENSOR_HEAD = struct.Struct("<BBB5s")
_LOSSY_HEAD = struct.Struct("<BBBB4sd")
_PAD5 = bytes(5)
_PAD4 = bytes(4)

# dtype code -> (numpy dtype on the wire, torch dtype name). bfloat16 has no numpy dtype:
# it travels as its raw 16-bit pattern and only torch-origin tensors may carry it.
_DTYPES: dict[int, tuple[np.dtype[Any] | None, str]] = {
    1: (np.dtype("<f8"), "float64"),
    2: (np.dtype("<f4"), "float32"),
    3: (np.dtype("<f2"), "float16"),
    4: (None, "bfloat16"),
    5: (np.dtype("<i8"), "int64"),
    6: (np.dtype("<i4"), "int32"),
    7: (np.dtype("<i2"), "int16"),
    8: (np.dtype("i1"), "int8"),
    9: (np.dtype("u1"), "uint8"),
    10: (np.dtype("?"), "bool"),
    11: (np.dtype("<u2"), "uint16"),
    12: (np.dtype("<u4"), "uint32"),
    13: (np.dtype("<u8"), "uint64"),
}
_BF16 = 4
_BOOL = 10
_FLOAT_CODES = frozenset((1, 2, 3, 4))
# numpy (kind, itemsize) -> dtype code; byte order is normalised separately.
_NP_CODES = {(dt.kind, dt.itemsize): code for code, (dt, _) in _DTYPES.items() if dt is not None}
_TORCH_CODES = {name: code for code, (_, name) in _DTYPES.items()}
_ITEMSIZE = {code: (2 if dt is None else dt.itemsize) for code, (dt, _) in _DTYPES.items()}

_SCALARS = frozenset((str, int, float, bool, type(None), bytes))
_FIELDS = ("k", "s", "r", "q", "t", "b")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame: the message ``body`` plus who sent it, when and in what order."""

    kind: str
    sender: str
    run: str
    seq: int
    time: float
    body: dict[str, Any]
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Lossy:
    """Explicit opt-in lossy encoding of one float array or tensor.

    ``fp16`` casts to float16 (finite values beyond float16's range raise at encode rather
    than silently becoming inf). ``int8`` quantises symmetrically with one per-tensor scale
    ``max|x| / 127``; its absolute error is at most ``scale / 2`` plus float rounding.
    Decode restores the original dtype and origin (numpy or torch).
    """

    value: np.ndarray[Any, Any] | torch.Tensor
    encoding: Literal["fp16", "int8"]

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise CodecError(f"unknown lossy encoding {self.encoding!r}; use 'fp16' or 'int8'")
        if not (isinstance(self.value, np.ndarray) or _is_torch_tensor(self.value)):
            raise CodecError(f"Lossy wraps a numpy array or torch tensor, not {_tname(self.value)}")


def fp16(x: np.ndarray[Any, Any] | torch.Tensor) -> Lossy:
    """Mark ``x`` to travel as float16 (decoded back to its original float dtype)."""
    return Lossy(x, "fp16")


def int8(x: np.ndarray[Any, Any] | torch.Tensor) -> Lossy:
    """Mark ``x`` to travel as symmetric per-tensor int8 (decoded to its original dtype)."""
    return Lossy(x, "int8")


def is_codec_frame(data: bytes | bytearray | memoryview) -> bool:
    """Cheap check that ``data`` starts like a codec frame (magic only; any version)."""
    return len(data) >= len(MAGIC) + 1 and bytes(data[: len(MAGIC)]) == MAGIC


def payload_nbytes(message: Any) -> int:
    """Sum of the tensor bytes a message puts on the wire (Lossy counts its encoded size)."""
    if isinstance(message, Lossy):
        n = _numel(message.value)
        return n * (2 if message.encoding == "fp16" else 1)
    if isinstance(message, np.ndarray):
        return int(message.nbytes)
    if _is_torch_tensor(message):
        return _numel(message) * int(message.element_size())
    if isinstance(message, Mapping):
        return sum(payload_nbytes(v) for v in message.values())
    if isinstance(message, list | tuple):
        return sum(payload_nbytes(v) for v in message)
    return 0


# --------------------------------------------------------------------------- encode


def encode(
    message: Mapping[str, Any],
    *,
    kind: str,
    sender: str = "",
    run: str = "",
    seq: int = 0,
    time: float | None = None,
) -> bytes:
    """Encode ``message`` into one codec frame.

    ``time`` defaults to the current unix time. Raises :class:`CodecError` naming the
    offending path (e.g. ``body['weights'][3]: unsupported type set``) for anything the
    codec cannot carry. Tensors with ``requires_grad`` are detached, GPU tensors copied to
    the CPU; each tensor's bytes are copied exactly once, into the returned frame.
    """
    if not isinstance(kind, str) or not kind:
        raise CodecError(f"kind must be a non-empty str, got {kind!r}")
    for name, value in (("sender", sender), ("run", run)):
        if not isinstance(value, str):
            raise CodecError(f"{name} must be a str, got {_tname(value)}")
    if not isinstance(seq, int) or isinstance(seq, bool) or not -(2**63) <= seq < 2**64:
        raise CodecError(f"seq must be an int in the msgpack range, got {seq!r}")
    stamp = _time.time() if time is None else time
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise CodecError(f"time must be a finite number, got {stamp!r}")
    if not isinstance(message, Mapping):
        raise CodecError(f"body: message must be a mapping, got {_tname(message)}")

    packer = _packer()
    parts: list[Any] = [MAGIC, bytes((VERSION,)), packer.pack_map_header(len(_FIELDS))]
    for item in ("k", kind, "s", sender, "r", run, "q", seq, "t", float(stamp), "b"):
        parts.append(packer.pack(item))
    try:
        _emit(message, ("body",), parts, packer, 0)
    except RecursionError as exc:  # deeply nested non-dict containers etc.
        raise CodecError("body: message nested too deeply") from exc
    # The one copy of every tensor's bytes: parts holds headers and tensor buffers.
    return b"".join(parts)


_local = threading.local()


def _packer() -> Any:
    # A Packer allocates its buffer up front; reuse one per thread instead of per call.
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        _local.packer = packer
    return packer


def _emit(obj: Any, path: tuple[Any, ...], out: list[Any], packer: Any, depth: int) -> None:
    # Paths are linked tuples (parent, key) so the happy path never formats a string.
    if depth > MAX_DEPTH:
        raise CodecError(f"{_fmt(path)}: nested deeper than {MAX_DEPTH} levels")
    t = type(obj)
    if t in _SCALARS:
        _pack_scalar(obj, path, out, packer)
    elif t is dict or isinstance(obj, Mapping):
        out.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            if type(key) is not str:
                raise CodecError(
                    f"{_fmt(path)}: dict key {key!r} is {_tname(key)}, keys must be str"
                )
            out.append(packer.pack(key))
            _emit(value, (path, key), out, packer, depth + 1)
    elif t is list or t is tuple:
        if _SCALARS.issuperset(map(type, obj)):
            try:  # fast path: msgpack packs a flat list of scalars in C
                out.append(packer.pack(obj))
                return
            except (OverflowError, ValueError, TypeError):
                pass  # fall through so the error names the offending element
        out.append(packer.pack_array_header(len(obj)))
        for i, value in enumerate(obj):
            _emit(value, (path, i), out, packer, depth + 1)
    elif isinstance(obj, np.ndarray):
        _emit_array(obj, _ORIGIN_NUMPY, path, out, bf16=False)
    elif _is_torch_tensor(obj):
        code, arr = _torch_to_numpy(obj, path)
        _emit_array(arr, _ORIGIN_TORCH, path, out, bf16=code == _BF16)
    elif isinstance(obj, Lossy):
        _emit_lossy(obj, path, out)
    elif isinstance(obj, np.bool_ | np.integer | np.floating):
        # numpy scalars (np.mean of a float32 array, ...) travel as Python scalars.
        _pack_scalar(obj.item(), path, out, packer)
    elif isinstance(obj, str | int | float | bytes):  # subclasses, e.g. IntEnum
        _pack_scalar(obj, path, out, packer)
    else:
        raise CodecError(f"{_fmt(path)}: unsupported type {_tname(obj)}")


def _pack_scalar(obj: Any, path: tuple[Any, ...], out: list[Any], packer: Any) -> None:
    try:
        out.append(packer.pack(obj))
    except (OverflowError, ValueError, TypeError) as exc:
        raise CodecError(f"{_fmt(path)}: cannot pack {_tname(obj)}: {exc}") from exc


def _ext_header(code: int, length: int, path: tuple[Any, ...]) -> bytes:
    # msgpack ext 8/16/32 framing, written by hand so the tensor bytes are not copied into
    # msgpack's buffer first (ext 8 for a length of 8 or 16 is valid, just not minimal).
    if length < 2**8:
        return struct.pack(">BBb", 0xC7, length, code)
    if length < 2**16:
        return struct.pack(">BHb", 0xC8, length, code)
    if length < 2**32:
        return struct.pack(">BIb", 0xC9, length, code)
    raise CodecError(f"{_fmt(path)}: tensor of {length} bytes exceeds msgpack's 4 GiB ext limit")


def _wire_array(arr: np.ndarray[Any, Any], path: tuple[Any, ...]) -> tuple[int, Any]:
    """Return (dtype code, little-endian C-contiguous array) for a numpy array."""
    dt = arr.dtype
    code = _NP_CODES.get((dt.kind, dt.itemsize)) if dt.fields is None else None
    if code is None or dt.subdtype is not None:
        raise CodecError(f"{_fmt(path)}: unsupported dtype {dt}")
    if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(dt.newbyteorder("<"), order="C")
    elif not arr.flags.c_contiguous:
        # np.ascontiguousarray would turn 0-d into 1-d; copy keeps the shape.
        arr = arr.copy(order="C")
    return code, arr


def _dims(shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(shape)}Q", *shape)


def _emit_array(
    arr: np.ndarray[Any, Any], origin: int, path: tuple[Any, ...], out: list[Any], bf16: bool
) -> None:
    code, wire = _wire_array(arr, path)
    code = _BF16 if bf16 else code  # bfloat16 arrives as its int16 bit patterns
    shape = arr.shape
    head = _TENSOR_HEAD.pack(origin, code, len(shape), _PAD5) + _dims(shape)
    out.append(_ext_header(EXT_TENSOR, len(head) + wire.nbytes, path) + head)
    out.append(wire)  # numpy arrays export the buffer protocol: joined without a copy here


def _torch_to_numpy(t: Any, path: tuple[Any, ...]) -> tuple[int, np.ndarray[Any, Any]]:
    """Return (dtype code, numpy view of a detached CPU copy); bfloat16 gives its int16 bits."""
    import torch

    if t.layout != torch.strided:
        raise CodecError(f"{_fmt(path)}: unsupported tensor layout {t.layout}")
    code = _TORCH_CODES.get(str(t.dtype).removeprefix("torch."))
    if code is None:
        raise CodecError(f"{_fmt(path)}: unsupported dtype {t.dtype}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if code == _BF16:
        t = t.view(torch.int16)  # numpy has no bfloat16: ship the raw 16-bit patterns
    return code, t.numpy()


def _emit_lossy(obj: Lossy, path: tuple[Any, ...], out: list[Any]) -> None:
    value = obj.value
    if isinstance(value, np.ndarray):
        origin = _ORIGIN_NUMPY
        code = _NP_CODES.get((value.dtype.kind, value.dtype.itemsize))
    else:
        origin = _ORIGIN_TORCH
        code = _TORCH_CODES.get(str(value.dtype).removeprefix("torch."))
    if code not in _FLOAT_CODES:
        raise CodecError(
            f"{_fmt(path)}: lossy {obj.encoding} needs a float tensor, not {value.dtype}"
        )
    if isinstance(value, np.ndarray):
        x = value
    else:
        # bfloat16 widens to float32 exactly; numpy cannot hold it directly.
        _, x = _torch_to_numpy(value.float() if code == _BF16 else value, path)
    shape = tuple(x.shape)
    if obj.encoding == "fp16":
        try:
            with np.errstate(over="raise"):
                data = x.astype("<f2", order="C")
        except FloatingPointError as exc:
            raise CodecError(f"{_fmt(path)}: value exceeds the float16 range") from exc
        enc, scale = _ENC_FP16, 1.0
    else:
        xw = x.astype(np.float64)  # float64 keeps x/scale exact enough for the error bound
        peak = float(np.max(np.abs(xw))) if xw.size else 0.0
        if not math.isfinite(peak):
            raise CodecError(f"{_fmt(path)}: int8 quantisation needs finite values")
        # Clamp: a subnormal peak must not give a zero scale, and q * scale must stay
        # finite in the original dtype (decode refuses larger scales: forged ones overflow).
        scale = min(max(peak / 127.0, 5e-324), _max_scale(code)) if peak > 0 else 1.0
        data = np.clip(np.rint(xw / scale), -127, 127).astype(np.int8, order="C")
        enc = _ENC_INT8
    head = _LOSSY_HEAD.pack(origin, enc, code, len(shape), _PAD4, scale) + _dims(shape)
    out.append(_ext_header(EXT_LOSSY, len(head) + data.nbytes, path) + head)
    out.append(data)


# --------------------------------------------------------------------------- decode


def decode(data: bytes | bytearray | memoryview) -> Envelope:
    """Decode one codec frame; raise :class:`CodecError` (only) for anything malformed.

    numpy arrays come back as read-only zero-copy views over the decoded ext buffer (call
    ``.copy()`` to write to one); torch tensors come back as writable CPU tensors with
    their own memory. Lossy values come back as new arrays/tensors in their original
    dtype. Lists come back as lists (tuples are not preserved).
    """
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise CodecError(
            f"cannot decode {_tname(data)}: not a contiguous bytes-like object"
        ) from exc
    if len(view) < len(MAGIC) + 1 or view[: len(MAGIC)] != MAGIC:
        raise CodecError(f"not an emo-mqtt codec frame: bad magic {bytes(view[:3])!r}")
    version = view[len(MAGIC)]
    if version not in SUPPORTED_VERSIONS:
        raise CodecError(
            f"unsupported codec version {version}; this build supports {list(SUPPORTED_VERSIONS)}"
        )
    body = view[len(MAGIC) + 1 :]
    # No container, string or ext can declare more items/bytes than the frame holds, so a
    # forged length can never make msgpack allocate beyond what the input justifies.
    limit = len(body)
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_ext_hook,
            object_hook=_check_map,
            # A foreign msgpack timestamp (ext -1, never consulted with ext_hook) becomes a
            # plain float, so bodies only ever hold the types encode() accepts.
            timestamp=1,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=limit,
        )
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError, KeyError, RecursionError) as exc:
        # ValueError covers ExtraData, FormatError, StackError and UnicodeDecodeError.
        raise CodecError(f"malformed codec frame: {type(exc).__name__}: {exc}") from exc
    except msgpack.UnpackException as exc:  # OutOfData, BufferFull
        raise CodecError(f"malformed codec frame: {type(exc).__name__}: {exc}") from exc
    return _envelope(obj, version)


def _envelope(obj: Any, version: int) -> Envelope:
    if type(obj) is not dict:
        raise CodecError(f"malformed codec frame: envelope is {_tname(obj)}, expected a map")
    missing = [f for f in _FIELDS if f not in obj]
    if missing:
        raise CodecError(f"malformed codec frame: envelope lacks field(s) {missing}")
    kind, sender, run, seq, stamp, body = (obj[f] for f in _FIELDS)
    for field, value, want in (("k", kind, str), ("s", sender, str), ("r", run, str)):
        if type(value) is not want:
            raise CodecError(f"malformed codec frame: envelope field {field!r} is {_tname(value)}")
    if type(seq) is not int:
        raise CodecError(f"malformed codec frame: envelope field 'q' (seq) is {_tname(seq)}")
    if type(stamp) not in (float, int):
        raise CodecError(f"malformed codec frame: envelope field 't' (time) is {_tname(stamp)}")
    if type(body) is not dict:
        raise CodecError(f"malformed codec frame: envelope field 'b' (body) is {_tname(body)}")
    # Extra envelope keys are ignored so a later minor revision may add fields.
    return Envelope(kind, sender, run, seq, float(stamp), body, version)


def _check_map(d: dict[Any, Any]) -> dict[Any, Any]:
    # strict_map_key lets bytes keys through; the codec only ever writes str keys.
    for key in d:
        if type(key) is not str:
            raise CodecError(f"malformed codec frame: map key of type {_tname(key)}")
    return d


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_TENSOR:
        return _decode_tensor(data)
    if code == EXT_LOSSY:
        return _decode_lossy(data)
    raise CodecError(f"malformed codec frame: unknown ext type code {code}")


def _read_shape(
    data: bytes, offset: int, ndim: int, itemsize: int, what: str
) -> tuple[tuple[int, ...], int]:
    """Parse and sanity-check dims; return (shape, element count) without allocating."""
    if ndim > MAX_NDIM:
        raise CodecError(f"malformed {what}: ndim {ndim} exceeds {MAX_NDIM}")
    if len(data) < offset + 8 * ndim:
        raise CodecError(f"malformed {what}: header truncated")
    shape = struct.unpack_from(f"<{ndim}Q", data, offset)
    count = math.prod(shape)
    # numpy refuses shapes whose non-zero dims overflow intp even when a zero dim makes
    # the array empty; reject those here so no numpy error leaks out as a surprise.
    if math.prod(d for d in shape if d) * itemsize >= 2**62:
        raise CodecError(f"malformed {what}: declared shape {shape} is absurdly large")
    expected = count * itemsize
    actual = len(data) - offset - 8 * ndim
    if expected != actual:
        raise CodecError(
            f"malformed {what}: shape {shape} needs {expected} data bytes, frame has {actual}"
        )
    return shape, count


def _decode_tensor(data: bytes) -> Any:
    if len(data) < _TENSOR_HEAD.size:
        raise CodecError("malformed tensor: header truncated")
    origin, code, ndim, pad = _TENSOR_HEAD.unpack_from(data)
    if pad != _PAD5 or origin not in (_ORIGIN_NUMPY, _ORIGIN_TORCH):
        raise CodecError(f"malformed tensor: bad origin {origin} or reserved bytes")
    if code not in _DTYPES:
        raise CodecError(f"malformed tensor: unknown dtype code {code}")
    shape, count = _read_shape(data, _TENSOR_HEAD.size, ndim, _ITEMSIZE[code], "tensor")
    start = _TENSOR_HEAD.size + 8 * ndim
    np_dtype, torch_name = _DTYPES[code]
    if code == _BOOL and count and np.frombuffer(data, np.uint8, count, start).max() > 1:
        raise CodecError("malformed tensor: bool bytes other than 0 and 1")
    if origin == _ORIGIN_NUMPY:
        if np_dtype is None:
            raise CodecError("malformed tensor: bfloat16 is only valid for torch tensors")
        # Zero-copy: a read-only view over the ext bytes msgpack already produced.
        arr = np.frombuffer(data, np_dtype, count, start).reshape(shape)
        return arr
    import torch

    dtype = getattr(torch, torch_name)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    # torch tensors are writable, so they need their own (writable) memory: one copy.
    buf = bytearray(memoryview(data)[start:])
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _decode_lossy(data: bytes) -> Any:
    if len(data) < _LOSSY_HEAD.size:
        raise CodecError("malformed lossy tensor: header truncated")
    origin, enc, code, ndim, pad, scale = _LOSSY_HEAD.unpack_from(data)
    if pad != _PAD4 or origin not in (_ORIGIN_NUMPY, _ORIGIN_TORCH):
        raise CodecError(f"malformed lossy tensor: bad origin {origin} or reserved bytes")
    if enc not in (_ENC_FP16, _ENC_INT8):
        raise CodecError(f"malformed lossy tensor: unknown encoding {enc}")
    if code not in _FLOAT_CODES or (code == _BF16 and origin == _ORIGIN_NUMPY):
        raise CodecError(f"malformed lossy tensor: bad original dtype code {code}")
    # Also bounds q * scale, so a forged scale cannot overflow to inf (or warn) below.
    if enc == _ENC_INT8 and not 0 < scale <= _max_scale(code):
        raise CodecError(f"malformed lossy tensor: bad int8 scale {scale}")
    wire = np.dtype("<f2") if enc == _ENC_FP16 else np.dtype("i1")
    shape, count = _read_shape(data, _LOSSY_HEAD.size, ndim, wire.itemsize, "lossy tensor")
    q = np.frombuffer(data, wire, count, _LOSSY_HEAD.size + 8 * ndim).reshape(shape)
    target = np.float32 if code == _BF16 else _DTYPES[code][0]
    wide = q if enc == _ENC_FP16 else q.astype(np.float64) * scale
    out = wide.astype(target)
    if origin == _ORIGIN_NUMPY:
        return out
    import torch

    t = torch.from_numpy(out)
    return t.to(torch.bfloat16) if code == _BF16 else t


# --------------------------------------------------------------------------- helpers


def _max_scale(code: int) -> float:
    """Largest int8 scale for which every q * scale (q >= -128) is finite in this dtype."""
    target = np.float32 if code == _BF16 else _DTYPES[code][0]
    return float(np.finfo(target).max) / 128.0


def _is_torch_tensor(obj: Any) -> bool:
    # Without importing torch: if it was never imported, obj cannot be a tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _numel(x: Any) -> int:
    return int(x.size) if isinstance(x, np.ndarray) else int(x.numel())


def _tname(obj: Any) -> str:
    return type(obj).__name__


def _fmt(path: tuple[Any, ...]) -> str:
    keys: list[Any] = []
    while len(path) == 2:
        path, key = path
        keys.append(key)
    return str(path[0]) + "".join(f"[{k!r}]" for k in reversed(keys))
