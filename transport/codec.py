"""The wire codec: a msgpack envelope in frame 0, large numpy arrays as their own frames.

Frame 0 is ``msgpack([VERSION, kind, request_id, [field values...]])``.  The
channel's schema says which fields are arrays; an array field's value is
``[dtype name, shape, payload]`` where payload is either the raw bytes (arrays of
at most ``inline_threshold`` bytes) or the index of the frame that carries them.
Big arrays are therefore never copied into the envelope: the sender passes them
to ZeroMQ with ``copy=False`` and the receiver wraps the frame in a read-only
``np.frombuffer`` view.  Decoding is strict: anything unexpected raises
``ProtocolError`` (with the request id once it is known).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import msgpack
import numpy as np

from fastdecode.transport.errors import ProtocolError
from fastdecode.transport.messages import (  # noqa: F401  (DTYPES is part of the codec's API)
    DTYPE_NAMES,
    DTYPES,
    MAX_REQUEST_ID,
    Channel,
    FieldSpec,
    Message,
    Schema,
)

VERSION = 1
DEFAULT_INLINE_THRESHOLD = 4096  # one page: seq_ids of up to 512 sequences ride in the envelope
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
MAX_NDIM = 8

_ARRAY, _INT, _OTHER = 0, 1, 2  # field plans: arrays, ints (a plain int passes at once), scalars by _check_scalar


def _plan(schema: Schema) -> tuple[tuple[str, int, FieldSpec], ...]:
    """Per field: (name, _ARRAY, _INT or _OTHER, spec) so the hot loops compare small ints, not strings."""
    codes = {"array": _ARRAY, "int": _INT}
    return tuple((spec.name, codes.get(spec.kind, _OTHER), spec) for spec in schema.fields)


def _is_positional(schema: Schema) -> bool:
    """True when the class's __init__ takes every wire field positionally, in wire order (no kw_only field)."""
    init_fields = [f.name for f in dataclasses.fields(schema.cls) if f.init and not f.kw_only]
    return init_fields == [spec.name for spec in schema.fields]


def _frame_buffer(frame: Any) -> memoryview:
    """A read-only memoryview over a zmq.Frame, bytes, memoryview or ndarray, without copying.

    Read-only so that ``np.frombuffer`` views on it are read-only without a flags call per array.
    """
    buffer = getattr(frame, "buffer", None)
    return (buffer if isinstance(buffer, memoryview) else memoryview(frame)).toreadonly()


def _is_int(value: Any) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def _check_scalar(spec: FieldSpec, value: Any) -> Any:
    kind = spec.kind
    if kind == "int" and _is_int(value):
        return value
    if kind == "float" and (isinstance(value, float) or _is_int(value)):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bytes" and isinstance(value, bytes):
        return value
    if kind == "int_tuple" and isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
        return tuple(value)
    if kind == "str_tuple" and isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ProtocolError(f"field {spec.name!r} must be {kind}, got {type(value).__name__}")


class Codec:
    """Encodes and decodes the messages of one channel.

    ``encode`` returns the frames to hand to ``send_multipart(copy=False)``: frame
    0 as bytes, then one flat uint8 ndarray view per big array (no copy when the
    array is C-contiguous).  ``decode`` takes the frames from
    ``recv_multipart(copy=False)`` (zmq.Frame, bytes or any buffer) and returns
    ``(request_id, message)`` whose arrays are read-only views on those frames.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
    ) -> None:
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        if inline_threshold < 0:
            raise ValueError(f"inline_threshold must be >= 0, got {inline_threshold}")
        self.channel = channel
        self.max_message_bytes = max_message_bytes
        self.inline_threshold = inline_threshold
        # precomputed per class (encode) and per kind (decode): the channel is read-only after import
        schemas = [channel.by_class(cls) for cls in channel.message_classes]
        self._encode_plans = {s.cls: (s, _plan(s)) for s in schemas if s is not None}
        self._decode_plans = {s.kind: (s, _plan(s), _is_positional(s)) for s in schemas if s is not None}

    # ---------------------------------------------------------------- encode
    def encode(self, request_id: int, message: Message) -> list[Any]:
        plan = self._encode_plans.get(type(message))
        if plan is None:
            raise TypeError(f"{type(message).__name__} is not a message of channel {self.channel.name}")
        if not _is_int(request_id) or not 0 <= request_id <= MAX_REQUEST_ID:
            raise ValueError(f"request_id must be an integer in [0, 2**63), got {request_id!r}")
        schema, fields = plan
        frames: list[Any] = [b""]
        values = []
        num_bytes = 0
        for name, field_kind, spec in fields:
            value = getattr(message, name)
            if value is None:
                if not spec.is_optional:
                    raise ValueError(f"{schema.cls.__name__}.{name} must not be None")
                values.append(None)
            elif field_kind == _INT and type(value) is int:
                values.append(value)
            elif field_kind == _ARRAY:
                desc, frame = self._encode_array(spec, value, len(frames))
                values.append(desc)
                if frame is not None:
                    frames.append(frame)
                    num_bytes += frame.nbytes
            else:
                values.append(_check_scalar(spec, value))
        frames[0] = msgpack.packb((VERSION, schema.kind, request_id, values), use_bin_type=True)
        num_bytes += len(frames[0])
        if num_bytes > self.max_message_bytes:
            raise ProtocolError(
                f"{schema.cls.__name__} is {num_bytes} bytes, over the maximum of {self.max_message_bytes}",
                request_id=request_id,
            )
        return frames

    def _encode_array(self, spec: FieldSpec, value: Any, frame_index: int) -> tuple[list, np.ndarray | None]:
        if not isinstance(value, np.ndarray):
            raise ProtocolError(f"field {spec.name!r} must be a numpy array, got {type(value).__name__}")
        name = DTYPE_NAMES.get(value.dtype)
        if name is None:  # a foreign byte order travels in the native one; anything else cannot travel
            if value.dtype.isnative or value.dtype.newbyteorder("=") not in DTYPE_NAMES:
                raise ProtocolError(f"field {spec.name!r}: dtype {value.dtype} cannot travel")
            value = value.astype(value.dtype.newbyteorder("="))
            name = DTYPE_NAMES[value.dtype]
        if value.ndim > MAX_NDIM:
            raise ProtocolError(f"field {spec.name!r}: rank {value.ndim} cannot travel")
        if not value.flags.c_contiguous:
            value = np.ascontiguousarray(value)
        if value.nbytes <= self.inline_threshold:
            return [name, value.shape, value.tobytes()], None
        # a byte view: any dtype, bfloat16 included, then exports a plain buffer
        return [name, value.shape, frame_index], (value.view(np.uint8) if value.ndim else value.reshape(1).view(np.uint8))

    # ---------------------------------------------------------------- decode
    def decode(self, frames: Sequence[Any]) -> tuple[int, Message]:
        if not frames:
            raise ProtocolError("empty message")
        buffers = [_frame_buffer(f) for f in frames]
        num_bytes = 0
        for buffer in buffers:
            num_bytes += buffer.nbytes
        envelope = self._unpack_envelope(buffers[0])
        request_id = envelope[2]
        if num_bytes > self.max_message_bytes:
            raise ProtocolError(f"message of {num_bytes} bytes is over the maximum of {self.max_message_bytes}",
                                request_id=request_id)
        version, kind, _, values = envelope
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version!r}", request_id=request_id)
        plan = self._decode_plans.get(kind) if _is_int(kind) else None
        if plan is None:
            raise ProtocolError(f"unknown message kind {kind!r} on channel {self.channel.name}",
                                request_id=request_id)
        schema, fields, is_positional = plan
        try:
            args = self._decode_fields(fields, values, buffers)
            if is_positional:
                return request_id, schema.cls(*args)
            return request_id, schema.cls(**{name: arg for (name, _, _), arg in zip(fields, args)})
        except ProtocolError as exc:
            raise ProtocolError(f"{schema.cls.__name__}: {exc}", request_id=request_id) from None
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"invalid {schema.cls.__name__}: {exc}", request_id=request_id) from None

    @staticmethod
    def _unpack_envelope(buffer: memoryview) -> tuple:
        try:
            envelope = msgpack.unpackb(buffer, use_list=False, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"frame 0 is not a msgpack envelope: {exc}") from None
        if not (isinstance(envelope, tuple) and len(envelope) == 4):
            raise ProtocolError("envelope must be [version, kind, request_id, fields]")
        request_id = envelope[2]
        if not _is_int(request_id) or not 0 <= request_id <= MAX_REQUEST_ID:
            raise ProtocolError(f"bad request id {request_id!r}")
        if not isinstance(envelope[3], tuple):
            raise ProtocolError("envelope fields must be an array", request_id=request_id)
        return envelope

    def _decode_fields(self, fields: tuple, values: tuple, buffers: list[memoryview]) -> list[Any]:
        """The field values in declaration order."""
        if len(values) != len(fields):
            raise ProtocolError(f"expected {len(fields)} fields, got {len(values)}")
        used = [False] * len(buffers)
        args: list[Any] = []
        for (name, field_kind, spec), value in zip(fields, values):
            if value is None:
                if not spec.is_optional:
                    raise ProtocolError(f"field {name!r} must not be null")
                args.append(None)
            elif field_kind == _INT and type(value) is int:
                args.append(value)
            elif field_kind == _ARRAY:
                args.append(self._decode_array(spec, value, buffers, used))
            else:
                args.append(_check_scalar(spec, value))
        if not all(used[1:]):
            raise ProtocolError(f"frame count mismatch: {len(buffers) - 1} array frames, {sum(used)} referenced")
        return args

    @staticmethod
    def _decode_array(spec: FieldSpec, desc: Any, buffers: list[memoryview], used: list[bool]) -> np.ndarray:
        if type(desc) is not tuple or len(desc) != 3:
            raise ProtocolError(f"field {spec.name!r} must be an array descriptor [dtype, shape, payload]")
        dtype_name, shape, payload = desc
        dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise ProtocolError(f"field {spec.name!r}: dtype {dtype_name!r} is not allowed")
        if type(shape) is not tuple or len(shape) > MAX_NDIM:
            raise ProtocolError(f"field {spec.name!r}: bad shape {shape!r}")
        num_items = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:  # msgpack gives bools as bool
                raise ProtocolError(f"field {spec.name!r}: bad shape {shape!r}")
            num_items *= dim
        if type(payload) is int:
            if not 1 <= payload < len(buffers) or used[payload]:
                raise ProtocolError(f"field {spec.name!r}: bad or reused frame index {payload}")
            used[payload] = True
            data: Any = buffers[payload]
            num_bytes = data.nbytes
        elif type(payload) is bytes:
            data, num_bytes = payload, len(payload)
        else:
            raise ProtocolError(f"field {spec.name!r}: payload must be bytes or a frame index")
        expected = num_items * dtype.itemsize
        if num_bytes != expected:
            raise ProtocolError(f"field {spec.name!r}: {shape} {dtype_name} needs {expected} bytes, got {num_bytes}")
        # one array object straight on the buffer; read-only: bytes, and frames through _frame_buffer
        return np.ndarray(shape, dtype, buffer=data)
