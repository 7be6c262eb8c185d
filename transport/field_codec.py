"""Per-class field encoders and decoders, generated once from a message schema.

On the attend path every message is encoded once and decoded once per layer per step, each time with caches
cold (a megabyte of tensors has gone through them since).  A generic loop over a field plan touches a tuple, a
spec and a name per field on every call; a function written out for the class touches its own code and little
else.  In place (B = 64), decoding an Attend takes 16 us instead of the loop's 26, an AttendResult 11 instead of
20 (docs/benchmarks.md, transport, session 3).  So the codec
builds one encoder and one decoder per message class, the way ``dataclasses`` builds ``__init__``: the source
is made from the schema alone (field names are Python identifiers, checked here; nothing from the wire goes
into it), and every check of the generic codec is kept:

- scalars: a value of the exact type passes, anything else goes through ``check_scalar`` (None only where the
  field is optional); an ``int_field``'s range is checked in line;
- arrays: ``decode_array``/``encode_array`` below, shared by every array field; on decode an ``array_field``'s
  rank and dtypes are checked from the descriptor, before the array object is made;
- a decoded message is built by filling its ``__dict__``; then it runs ``validate`` (its rules across fields),
  which with the field rules above is what its constructor checks (``Message.__post_init__``).  A class with
  a ``__post_init__`` of its own gets that run instead, in full.
"""
from __future__ import annotations

import keyword
from typing import Any, Callable, Sequence

import numpy as np

from fastdecode.transport.errors import ProtocolError
from fastdecode.transport.messages import DTYPE_NAMES, DTYPES, ArrayRule, FieldSpec, IntRule, Message, Schema

MAX_NDIM = 8
# plain dicts: a MappingProxy lookup costs twice as much (read-only like the originals: nothing writes them)
_DTYPES = dict(DTYPES)
_DTYPE_NAMES = dict(DTYPE_NAMES)
_UINT8 = np.dtype(np.uint8)  # a view to a dtype object skips numpy's conversion of the type (0.1 us per array)
_EXACT_TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "str", "bytes": "bytes"}

# (values, frames) -> (message, bytes of the array frames); raises ProtocolError, ValueError or TypeError
FieldDecoder = Callable[[tuple, Sequence[Any]], tuple[Any, int]]
# (message, frames to append the array frames to, inline threshold) -> (envelope values, bytes of those frames)
FieldEncoder = Callable[[Any, list, int], tuple[tuple, int]]


def is_int(value: Any) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def check_scalar(spec: FieldSpec, value: Any) -> Any:
    """A non-array field's value as it travels (tuples as tuples, ints as floats where a float is due)."""
    kind = spec.kind
    if value is None and spec.is_optional:
        return None
    if kind == "int" and is_int(value):
        return value
    if kind == "float" and (isinstance(value, float) or is_int(value)):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bytes" and isinstance(value, bytes):
        return value
    if kind == "int_tuple" and isinstance(value, (tuple, list)) and all(is_int(v) for v in value):
        return tuple(value)
    if kind == "str_tuple" and isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if value is None:
        raise ProtocolError(f"field {spec.name!r} must not be null")
    raise ProtocolError(f"field {spec.name!r} must be {kind}, got {type(value).__name__}")


def check_int(spec: FieldSpec, value: Any) -> int:
    """An int field's value within its ``int_field`` range."""
    value = check_scalar(spec, value)
    rule = spec.rule
    if value is not None and isinstance(rule, IntRule) and not rule.min_value <= value <= rule.max_value:
        raise ProtocolError(f"field {spec.name!r} must be in [{rule.min_value}, {rule.max_value}], got {value}")
    return value


def decode_array(name: str, desc: Any, frames: Sequence[Any], used: int, dtypes: dict[str, np.dtype], ndim: int
                 ) -> tuple[np.ndarray, int, int]:
    """An array field's descriptor ``[dtype, shape, payload]`` as a read-only array on its frame or bytes.

    ``dtypes`` are the field's allowed dtypes by name and ``ndim`` its rank (-1: any up to MAX_NDIM), from its
    ``array_field`` rule.  ``used`` has bit i set for each frame already taken; returns (array, used, bytes of
    the frame taken).
    """
    if type(desc) is not tuple or len(desc) != 3:
        raise ProtocolError(f"field {name!r} must be an array descriptor [dtype, shape, payload]")
    dtype_name, shape, payload = desc
    dtype = dtypes.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise ProtocolError(f"field {name!r}: dtype {dtype_name!r} is not allowed (allowed: {', '.join(dtypes)})")
    if type(shape) is not tuple or (len(shape) != ndim if ndim >= 0 else len(shape) > MAX_NDIM):
        raise ProtocolError(f"field {name!r}: bad shape {shape!r}" + (f" (rank {ndim} expected)" if ndim >= 0 else ""))
    num_items = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:  # msgpack gives bools as bool
            raise ProtocolError(f"field {name!r}: bad shape {shape!r}")
        num_items *= dim
    frame_bytes = 0
    if type(payload) is int:
        if not 0 < payload < len(frames) or used >> payload & 1:
            raise ProtocolError(f"field {name!r}: bad or reused frame index {payload}")
        used |= 1 << payload
        data: Any = memoryview(frames[payload]).toreadonly()  # read-only, so the array is read-only
        frame_bytes = size = data.nbytes
    elif type(payload) is bytes:
        data, size = payload, len(payload)
    else:
        raise ProtocolError(f"field {name!r}: payload must be bytes or a frame index")
    if size != num_items * dtype.itemsize:
        raise ProtocolError(f"field {name!r}: {shape} {dtype_name} needs {num_items * dtype.itemsize} bytes, "
                            f"got {size}")
    return np.ndarray(shape, dtype, data), used, frame_bytes  # buffer positional: keywords cost 0.1 us


def encode_array(name: str, value: Any, frames: list, inline_threshold: int) -> tuple[tuple, int]:
    """An array's descriptor; an array over ``inline_threshold`` bytes is appended to ``frames`` as a flat byte
    view (no copy when C-contiguous) and its descriptor names that frame.  Returns (descriptor, frame bytes)."""
    if type(value) is not np.ndarray and not isinstance(value, np.ndarray):
        raise ProtocolError(f"field {name!r} must be a numpy array, got {type(value).__name__}")
    dtype_name = _DTYPE_NAMES.get(value.dtype)
    if dtype_name is None:  # a foreign byte order travels in the native one; anything else cannot travel
        if value.dtype.isnative or value.dtype.newbyteorder("=") not in _DTYPE_NAMES:
            raise ProtocolError(f"field {name!r}: dtype {value.dtype} cannot travel")
        value = value.astype(value.dtype.newbyteorder("="))
        dtype_name = _DTYPE_NAMES[value.dtype]
    if value.ndim > MAX_NDIM:
        raise ProtocolError(f"field {name!r}: rank {value.ndim} cannot travel")
    if not value.flags.c_contiguous:
        value = np.ascontiguousarray(value)
    num_bytes = value.nbytes
    if num_bytes <= inline_threshold:
        return (dtype_name, value.shape, value.tobytes()), 0
    frames.append(value.view(_UINT8) if value.ndim else value.reshape(1).view(_UINT8))
    return (dtype_name, value.shape, len(frames) - 1), num_bytes


def _check_names(schema: Schema) -> None:
    for spec in schema.fields:
        if not spec.name.isidentifier() or keyword.iskeyword(spec.name) or spec.name.startswith("__"):
            raise TypeError(f"{schema.cls.__name__}.{spec.name}: not a field name the codec can generate code for")


def _has_plain_dict(cls: type) -> bool:
    """True when an instance keeps every field in its ``__dict__`` (no ``__slots__`` anywhere but ``object``)."""
    return not any("__slots__" in vars(klass) for klass in cls.__mro__[:-1])


def _compile(source: str, name: str, namespace: dict[str, Any]) -> Callable:
    exec(compile(source, f"<fastdecode codec: {name}>", "exec"), namespace)  # noqa: S102 - source from the schema
    return namespace[name]


def build_decoder(schema: Schema) -> FieldDecoder:
    """A function of (envelope field values, frames) that checks every field and builds the message."""
    _check_names(schema)
    cls = schema.cls
    num_fields = len(schema.fields)
    post_init = getattr(cls, "__post_init__", None)
    if post_init is Message.__post_init__:  # field rules in line below, then only the rules across fields
        post_init = None if cls.validate is Message.validate else cls.validate
    namespace: dict[str, Any] = {
        "ProtocolError": ProtocolError, "check_scalar": check_scalar, "check_int": check_int,
        "decode_array": decode_array, "new": object.__new__, "cls": cls, "post_init": post_init,
        "ndarray": np.ndarray,
    }
    lines = ["def decode_fields(values, frames):",
             f"    if len(values) != {num_fields}:",
             f"        raise ProtocolError(f'expected {num_fields} fields, got {{len(values)}}')"]
    if num_fields:
        lines.append(f"    {', '.join(f'v{i}' for i in range(num_fields))}{',' if num_fields == 1 else ''} = values")
    lines += ["    used = 1", "    num_bytes = 0"]
    for i, spec in enumerate(schema.fields):
        namespace[f"spec{i}"] = spec
        if spec.kind == "array":
            rule = spec.rule if isinstance(spec.rule, ArrayRule) else None
            namespace[f"dtypes{i}"] = _DTYPES if rule is None else {name: _DTYPES[name] for name in rule.dtypes}
            ndim = -1 if rule is None else rule.ndim
            call = f"v{i}, used, frame_bytes = decode_array({spec.name!r}, v{i}, frames, used, dtypes{i}, {ndim})"
            if ndim > 0:  # the common case in line (frame or bytes payload); anything else goes to decode_array
                dims = [f"s{i}[{d}]" for d in range(ndim)]
                size = f"{' * '.join(dims)} * d{i}.itemsize"
                lines += [
                    f"    if (type(v{i}) is tuple and len(v{i}) == 3 and type(v{i}[0]) is str",
                    f"            and type(s{i} := v{i}[1]) is tuple and len(s{i}) == {ndim}",
                    "            and " + " and ".join(f"type({d}) is int and {d} >= 0" for d in dims),
                    f"            and (d{i} := dtypes{i}.get(v{i}[0])) is not None):",
                    f"        p{i} = v{i}[2]",
                    f"        if (type(p{i}) is int and 0 < p{i} < len(frames) and not used >> p{i} & 1",
                    f"                and (m{i} := memoryview(frames[p{i}]).toreadonly()).nbytes == {size}):",
                    f"            v{i} = ndarray(s{i}, d{i}, m{i})  # buffer positional: numpy parses keywords slowly",
                    f"            used |= 1 << p{i}",
                    f"            num_bytes += m{i}.nbytes",
                    f"        elif type(p{i}) is bytes and len(p{i}) == {size}:",
                    f"            v{i} = ndarray(s{i}, d{i}, p{i})",
                    "        else:",
                    f"            {call}",
                    "            num_bytes += frame_bytes",
                    f"    elif v{i} is not None:",
                    f"        {call}",
                    "        num_bytes += frame_bytes"]
            else:
                lines += [f"    if v{i} is not None:", f"        {call}", "        num_bytes += frame_bytes"]
            if not spec.is_optional:
                lines += ["    else:", f"        raise ProtocolError({f'field {spec.name!r} must not be null'!r})"]
        elif isinstance(spec.rule, IntRule):
            lines += [f"    if type(v{i}) is not int or not {spec.rule.min_value} <= v{i} <= {spec.rule.max_value}:",
                      f"        v{i} = check_int(spec{i}, v{i})"]
        elif spec.kind in _EXACT_TYPES:
            lines += [f"    if type(v{i}) is not {_EXACT_TYPES[spec.kind]}:",
                      f"        v{i} = check_scalar(spec{i}, v{i})"]
        else:
            lines.append(f"    v{i} = check_scalar(spec{i}, v{i})")
    lines += ["    if used != (1 << len(frames)) - 1:",
              "        raise ProtocolError(f'frame count mismatch: {len(frames) - 1} array frames, '",
              "                            f'{bin(used).count(\"1\") - 1} referenced')"]
    attrs = ", ".join(f"{spec.name}=v{i}" for i, spec in enumerate(schema.fields))
    if _has_plain_dict(cls):
        lines += ["    message = new(cls)", f"    message.__dict__.update({attrs})"]
        if post_init is not None:
            lines.append("    post_init(message)")
    else:
        lines.append(f"    message = cls({attrs})")
    lines.append("    return message, num_bytes")
    return _compile("\n".join(lines), "decode_fields", namespace)


def build_encoder(schema: Schema) -> FieldEncoder:
    """A function of (message, frames, inline_threshold) that checks every field and returns the envelope's
    field values, appending the big arrays to ``frames``."""
    _check_names(schema)
    namespace: dict[str, Any] = {"ProtocolError": ProtocolError, "check_scalar": check_scalar,
                                 "encode_array": encode_array, "ndarray": np.ndarray, "uint8": _UINT8,
                                 "dtype_names": _DTYPE_NAMES}
    cls_name = schema.cls.__name__
    lines = ["def encode_fields(message, frames, inline_threshold):", "    num_bytes = 0"]
    for i, spec in enumerate(schema.fields):
        namespace[f"spec{i}"] = spec
        lines.append(f"    v{i} = message.{spec.name}")
        none_case = ("pass" if spec.is_optional
                     else f"raise ValueError({f'{cls_name}.{spec.name} must not be None'!r})")
        if spec.kind == "array":  # the common case in line: a C-contiguous array of a known dtype, own frame
            lines += [f"    if (type(v{i}) is ndarray and 0 < v{i}.ndim <= {MAX_NDIM} and v{i}.flags.c_contiguous",
                      f"            and v{i}.nbytes > inline_threshold",
                      f"            and (name{i} := dtype_names.get(v{i}.dtype)) is not None):",
                      f"        frames.append(v{i}.view(uint8))",
                      f"        num_bytes += v{i}.nbytes",
                      f"        v{i} = (name{i}, v{i}.shape, len(frames) - 1)",
                      f"    elif v{i} is not None:",
                      f"        v{i}, frame_bytes = encode_array({spec.name!r}, v{i}, frames, inline_threshold)",
                      "        num_bytes += frame_bytes",
                      "    else:", f"        {none_case}"]
        else:
            exact = _EXACT_TYPES.get(spec.kind)
            lines += [f"    if v{i} is None:", f"        {none_case}",
                      f"    {'elif type(v%d) is not %s' % (i, exact) if exact else 'else'}:",
                      f"        v{i} = check_scalar(spec{i}, v{i})"]
    values = "".join(f"v{i}, " for i in range(len(schema.fields)))
    lines.append(f"    return ({values}), num_bytes")
    return _compile("\n".join(lines), "encode_fields", namespace)
