"""The emo-mqtt wire codec: msgpack envelopes carrying numpy arrays and torch tensors.

A frame is a small msgpack map followed by the raw bytes of every tensor in it::

    MAGIC | u8 VERSION | u32 n | n bytes of msgpack | zero padding to a multiple of 8 | data

The msgpack map is ``{"k": kind, "s": sender, "r": run, "q": seq, "t": time, "b": body}``.
``body`` may hold msgpack-native values (None, bool, int, float, str, bytes, lists, tuples
and dicts with str keys), numpy arrays, torch tensors and :class:`Lossy` wrappers, nested
arbitrarily. A tensor is a msgpack ExtType *descriptor* in the map; its bytes travel out of
band (as in pickle protocol 5), raw little-endian C-order, in the data section after the
map. That is what makes the codec cheap: encode assembles the frame with one join (one copy
of each tensor), and decode hands out numpy arrays that are zero-copy views of the frame.
A round trip is bit-exact (NaN payloads, -0.0, 0-d and zero-size tensors included).

Tensor descriptor (``EXT_TENSOR``)::

    u8 origin (0 numpy, 1 torch) | u8 dtype code | u8 ndim | 5 zero bytes | u64 offset
    | ndim x u64 dims

Lossy descriptor (``EXT_LOSSY``)::

    u8 origin | u8 encoding (1 fp16, 2 int8) | u8 original dtype code | u8 ndim
    | 4 zero bytes | f64 scale | u64 offset | ndim x u64 dims

``offset`` is where the tensor's bytes start in the data section; their length follows from
dtype and dims. The layout is canonical, which keeps validation simple and leaves no room
for aliasing: tensors follow one another in the order their descriptors appear in the
msgpack stream, each at the next multiple of 8 (zero bytes in between), and the data
section ends with the last one. Every offset is checked against that layout, and every
length against the bytes present, before anything is allocated.

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
#: 2: tensor bytes out of band, after the msgpack map (1 carried them inside msgpack ExtTypes).
VERSION = 2
SUPPORTED_VERSIONS = (2,)

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

_PREFIX = struct.Struct("<3sBI")  # MAGIC, version, msgpack length
_TENSOR_HEAD = struct.Struct("<BBB5sQ")
_LOSSY_HEAD = struct.Struct("<BBBB4sdQ")
_PAD5 = bytes(5)
_PAD4 = bytes(4)
_ALIGN = 8  # the largest itemsize: every tensor view is aligned for its dtype
_ZEROS = bytes(_ALIGN)

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
    out = _Out(packer)
    out.meta.append(packer.pack_map_header(len(_FIELDS)))
    for item in ("k", kind, "s", sender, "r", run, "q", seq, "t", float(stamp), "b"):
        out.meta.append(packer.pack(item))
    try:
        _emit(message, ("body",), out, 0)
    except RecursionError as exc:  # deeply nested non-dict containers etc.
        raise CodecError("body: message nested too deeply") from exc
    meta = b"".join(out.meta)  # small: descriptors only, no tensor bytes
    if len(meta) >= 2**32:
        raise CodecError("body: message structure exceeds the 4 GiB msgpack limit")
    prefix = _PREFIX.pack(MAGIC, VERSION, len(meta))
    pad = _ZEROS[: -(len(prefix) + len(meta)) % _ALIGN]
    # The one copy of every tensor's bytes: out.data holds the tensor buffers themselves.
    return b"".join((prefix, meta, pad, *out.data))


class _Out:
    """What encode accumulates: msgpack pieces and the data section's buffers."""

    __slots__ = ("data", "meta", "packer", "size")

    def __init__(self, packer: Any) -> None:
        self.packer = packer
        self.meta: list[bytes] = []
        self.data: list[Any] = []
        self.size = 0  # bytes in the data section so far

    def add(self, buf: Any, nbytes: int) -> int:
        """Append a tensor's buffer to the data section (aligned); return its offset."""
        pad = -self.size % _ALIGN
        if pad:
            self.data.append(_ZEROS[:pad])
        offset = self.size + pad
        if nbytes:
            self.data.append(buf)  # numpy arrays export the buffer protocol: no copy here
        self.size = offset + nbytes
        return offset


_local = threading.local()


def _packer() -> Any:
    # A Packer allocates its buffer up front; reuse one per thread instead of per call.
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        _local.packer = packer
    return packer


def _emit(obj: Any, path: tuple[Any, ...], out: _Out, depth: int) -> None:
    # Paths are linked tuples (parent, key) so the happy path never formats a string.
    if depth > MAX_DEPTH:
        raise CodecError(f"{_fmt(path)}: nested deeper than {MAX_DEPTH} levels")
    t = type(obj)
    meta, packer = out.meta, out.packer
    if t in _SCALARS:
        _pack_scalar(obj, path, meta, packer)
    elif t is dict or isinstance(obj, Mapping):
        meta.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            if type(key) is not str:
                raise CodecError(
                    f"{_fmt(path)}: dict key {key!r} is {_tname(key)}, keys must be str"
                )
            meta.append(packer.pack(key))
            _emit(value, (path, key), out, depth + 1)
    elif t is list or t is tuple:
        if _SCALARS.issuperset(map(type, obj)):
            try:  # fast path: msgpack packs a flat list of scalars in C
                meta.append(packer.pack(obj))
                return
            except (OverflowError, ValueError, TypeError):
                pass  # fall through so the error names the offending element
        meta.append(packer.pack_array_header(len(obj)))
        for i, value in enumerate(obj):
            _emit(value, (path, i), out, depth + 1)
    elif isinstance(obj, np.ndarray):
        _emit_array(obj, _ORIGIN_NUMPY, path, out, bf16=False)
    elif _is_torch_tensor(obj):
        code, arr = _torch_to_numpy(obj, path)
        _emit_array(arr, _ORIGIN_TORCH, path, out, bf16=code == _BF16)
    elif isinstance(obj, Lossy):
        _emit_lossy(obj, path, out)
    elif isinstance(obj, np.bool_ | np.integer | np.floating):
        # numpy scalars (np.mean of a float32 array, ...) travel as Python scalars.
        _pack_scalar(obj.item(), path, meta, packer)
    elif isinstance(obj, str | int | float | bytes):  # subclasses, e.g. IntEnum
        _pack_scalar(obj, path, meta, packer)
    else:
        raise CodecError(f"{_fmt(path)}: unsupported type {_tname(obj)}")


def _pack_scalar(obj: Any, path: tuple[Any, ...], out: list[Any], packer: Any) -> None:
    try:
        out.append(packer.pack(obj))
    except (OverflowError, ValueError, TypeError) as exc:
        raise CodecError(f"{_fmt(path)}: cannot pack {_tname(obj)}: {exc}") from exc


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
    arr: np.ndarray[Any, Any], origin: int, path: tuple[Any, ...], out: _Out, bf16: bool
) -> None:
    code, wire = _wire_array(arr, path)
    code = _BF16 if bf16 else code  # bfloat16 arrives as its int16 bit patterns
    shape = arr.shape
    offset = out.add(wire, wire.nbytes)
    head = _TENSOR_HEAD.pack(origin, code, len(shape), _PAD5, offset) + _dims(shape)
    out.meta.append(out.packer.pack(msgpack.ExtType(EXT_TENSOR, head)))


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


def _emit_lossy(obj: Lossy, path: tuple[Any, ...], out: _Out) -> None:
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
    offset = out.add(data, data.nbytes)
    head = _LOSSY_HEAD.pack(origin, enc, code, len(shape), _PAD4, scale, offset) + _dims(shape)
    out.meta.append(out.packer.pack(msgpack.ExtType(EXT_LOSSY, head)))


# --------------------------------------------------------------------------- decode


def decode(data: bytes | bytearray | memoryview) -> Envelope:
    """Decode one codec frame; raise :class:`CodecError` (only) for anything malformed.

    numpy arrays come back as read-only zero-copy views of ``data`` (aligned for their
    dtype when ``data`` is; call ``.copy()`` to write to one): they keep the frame alive,
    and a caller that decodes a mutable buffer must not change it while they live. torch
    tensors come back as writable CPU tensors with their own memory. Lossy values come back
    as new arrays/tensors in their original dtype. Lists come back as lists (tuples are
    not preserved).
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
    if len(view) < _PREFIX.size:
        raise CodecError("malformed codec frame: prefix truncated")
    meta_end = _PREFIX.size + _PREFIX.unpack_from(view)[2]
    data_start = meta_end + (-meta_end % _ALIGN)
    if len(view) < data_start or any(view[meta_end:data_start]):
        raise CodecError(
            f"malformed codec frame: {len(view)} bytes, the msgpack map and its padding "
            f"need {data_start}"
        )
    meta = view[_PREFIX.size : meta_end]
    section = _Section(view[data_start:])
    # No container, string or ext can declare more items/bytes than the map holds, so a
    # forged length can never make msgpack allocate beyond what the input justifies.
    limit = len(meta)
    try:
        obj = msgpack.unpackb(
            meta,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=section.ext_hook,
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
    if section.cursor != len(section.view):
        raise CodecError(
            f"malformed codec frame: {len(section.view) - section.cursor} bytes after the "
            f"last tensor"
        )
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


class _Section:
    """The data section of one frame, handed out tensor by tensor in canonical order."""

    __slots__ = ("cursor", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.cursor = 0  # end of the last tensor handed out

    def take(self, offset: int, nbytes: int, what: str) -> int:
        """Check a descriptor's offset and length against the layout; return the offset."""
        expected = self.cursor + (-self.cursor % _ALIGN)
        if offset != expected:
            raise CodecError(f"malformed {what}: data offset {offset}, expected {expected}")
        available = len(self.view) - offset
        if nbytes > available:
            raise CodecError(
                f"malformed {what}: needs {nbytes} data bytes, frame has {max(available, 0)}"
            )
        if any(self.view[self.cursor : offset]):
            raise CodecError(f"malformed {what}: non-zero padding before its data")
        self.cursor = offset + nbytes
        return offset

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_TENSOR:
            return _decode_tensor(data, self)
        if code == EXT_LOSSY:
            return _decode_lossy(data, self)
        raise CodecError(f"malformed codec frame: unknown ext type code {code}")


def _read_shape(
    data: bytes, offset: int, ndim: int, itemsize: int, what: str
) -> tuple[tuple[int, ...], int]:
    """Parse and sanity-check dims; return (shape, element count) without allocating."""
    if ndim > MAX_NDIM:
        raise CodecError(f"malformed {what}: ndim {ndim} exceeds {MAX_NDIM}")
    if len(data) != offset + 8 * ndim:
        raise CodecError(f"malformed {what}: descriptor of {len(data)} bytes for {ndim} dims")
    shape = struct.unpack_from(f"<{ndim}Q", data, offset)
    # numpy refuses shapes whose non-zero dims overflow intp even when a zero dim makes
    # the array empty; reject those here so no numpy error leaks out as a surprise.
    if math.prod(d for d in shape if d) * itemsize >= 2**62:
        raise CodecError(f"malformed {what}: declared shape {shape} is absurdly large")
    return shape, math.prod(shape)


def _decode_tensor(data: bytes, section: _Section) -> Any:
    if len(data) < _TENSOR_HEAD.size:
        raise CodecError("malformed tensor: descriptor truncated")
    origin, code, ndim, pad, offset = _TENSOR_HEAD.unpack_from(data)
    if pad != _PAD5 or origin not in (_ORIGIN_NUMPY, _ORIGIN_TORCH):
        raise CodecError(f"malformed tensor: bad origin {origin} or reserved bytes")
    if code not in _DTYPES:
        raise CodecError(f"malformed tensor: unknown dtype code {code}")
    itemsize = _ITEMSIZE[code]
    shape, count = _read_shape(data, _TENSOR_HEAD.size, ndim, itemsize, "tensor")
    start = section.take(offset, count * itemsize, "tensor")
    buf = section.view
    np_dtype, torch_name = _DTYPES[code]
    if code == _BOOL and count and np.frombuffer(buf, np.uint8, count, start).max() > 1:
        raise CodecError("malformed tensor: bool bytes other than 0 and 1")
    if origin == _ORIGIN_NUMPY:
        if np_dtype is None:
            raise CodecError("malformed tensor: bfloat16 is only valid for torch tensors")
        # Zero-copy: a view of the frame itself, read-only even over a mutable buffer.
        arr = np.frombuffer(buf, np_dtype, count, start).reshape(shape)
        if not arr.flags.aligned:  # only when the caller's buffer itself is misaligned
            arr = arr.copy()
        arr.flags.writeable = False
        return arr
    import torch

    dtype = getattr(torch, torch_name)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    # torch tensors are writable, so they need their own (writable) memory: one copy.
    own = bytearray(buf[start : start + count * itemsize])
    return torch.frombuffer(own, dtype=dtype).reshape(shape)


def _decode_lossy(data: bytes, section: _Section) -> Any:
    if len(data) < _LOSSY_HEAD.size:
        raise CodecError("malformed lossy tensor: descriptor truncated")
    origin, enc, code, ndim, pad, scale, offset = _LOSSY_HEAD.unpack_from(data)
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
    start = section.take(offset, count * wire.itemsize, "lossy tensor")
    q = np.frombuffer(section.view, wire, count, start).reshape(shape)
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
