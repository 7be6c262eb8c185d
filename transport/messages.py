"""Typed wire messages: the base class, field schemas and the per-channel kind table.

A message is a frozen dataclass deriving from ``Message`` with a small-int ``KIND``
class attribute.  Its fields may be ``int``, ``float``, ``bool``, ``str``,
``bytes``, ``numpy.ndarray``, ``tuple[int, ...]`` or ``tuple[str, ...]``, each
optionally ``| None``.  A ``Channel`` collects the message classes one pair of
actors exchange and maps kind tags to classes; the codec only ever decodes a kind
into a class through that table.  Checks of one field (an array's rank and dtypes,
an int's range) are declared with ``array_field``/``int_field``; checks across
fields live in the message's ``validate``.  Both run on construction
(``Message.__post_init__``) and on decode (where the codec checks the declared
rules from the wire descriptor itself, before any array object exists).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import ClassVar, Sequence

import ml_dtypes  # noqa: F401  (registers the "bfloat16" dtype name with numpy)
import numpy as np

MAX_KIND = 255
MAX_REQUEST_ID = 2**63 - 1

# The dtypes an array field may have, by name, and back (native byte order only: a dict lookup is much
# cheaper than numpy's ``dtype.name``, which is computed in Python on every access).
DTYPES = types.MappingProxyType(
    {
        name: np.dtype(name)
        for name in (
            "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
            "float16", "float32", "float64", "bfloat16",
        )
    }
)
_NAME_OF_DTYPE = {dtype: name for name, dtype in DTYPES.items()}  # never written: DTYPE_NAMES is its read-only face
DTYPE_NAMES = types.MappingProxyType(_NAME_OF_DTYPE)


_RULE_KEY = "fastdecode.field_rule"  # where array_field/int_field keep their rule in a dataclass field's metadata


@dataclass(frozen=True)
class ArrayRule:
    """An array field's rank and allowed dtype names (None is allowed only for an optional field)."""

    ndim: int
    dtypes: tuple[str, ...]
    is_optional: bool = False

    def check(self, value: object, name: str) -> None:
        if type(value) is np.ndarray and value.ndim == self.ndim and _NAME_OF_DTYPE.get(value.dtype) in self.dtypes:
            return  # the common case in line: this runs for every array of every message built
        if value is None and self.is_optional:
            return
        require_array(value, name, ndim=self.ndim, dtypes=self.dtypes)


@dataclass(frozen=True)
class IntRule:
    """An int field's inclusive range."""

    min_value: int
    max_value: int

    def check(self, value: object, name: str) -> None:
        if type(value) is not int or not self.min_value <= value <= self.max_value:
            require_int(value, name, min_value=self.min_value, max_value=self.max_value)


def array_field(*, ndim: int, dtypes: Sequence[str], is_optional: bool = False, default: object = dataclasses.MISSING):
    """A message field holding an ndarray of rank ``ndim`` and one of ``dtypes`` (None too when ``is_optional``,
    which must match a ``X | None`` annotation)."""
    unknown = [name for name in dtypes if name not in DTYPES]
    if unknown:
        raise TypeError(f"unknown dtype names {unknown}")
    rule = ArrayRule(ndim, tuple(dtypes), is_optional)
    return dataclasses.field(default=default, metadata={_RULE_KEY: rule})  # type: ignore[call-overload]


def int_field(*, min_value: int = 0, max_value: int = MAX_REQUEST_ID, default: object = dataclasses.MISSING):
    """A message int field that must lie in ``[min_value, max_value]``."""
    rule = IntRule(min_value, max_value)
    return dataclasses.field(default=default, metadata={_RULE_KEY: rule})  # type: ignore[call-overload]


class Message:
    """Base of every wire message.  Subclasses are frozen dataclasses with a unique ``KIND``.

    A subclass declares per-field rules with ``array_field``/``int_field`` and its rules across fields in
    ``validate``; it should not define ``__post_init__`` itself (the codec then runs that instead, in full, on
    every decoded message).
    """

    KIND: ClassVar[int] = -1
    # For a request: the message class of its successful reply (an ErrorReply may always come instead).
    REPLY: ClassVar[type["Message"] | None] = None
    # (field name, rule) for every field declared with array_field or int_field; collected at class creation
    FIELD_RULES: ClassVar[tuple[tuple[str, ArrayRule | IntRule], ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # the dataclass decorator has not run yet: the class still holds the Field objects of its fields
        own = tuple((name, value.metadata[_RULE_KEY]) for name, value in vars(cls).items()
                    if isinstance(value, dataclasses.Field) and _RULE_KEY in value.metadata)
        cls.FIELD_RULES = cls.FIELD_RULES + own

    def __post_init__(self) -> None:
        """On construction: every declared field rule, then ``validate``.  Raises ValueError."""
        for name, rule in self.FIELD_RULES:
            rule.check(getattr(self, name), name)
        self.validate()

    def validate(self) -> None:
        """Rules across fields; runs after the field rules, on construction and on decode.  Raises ValueError."""


@dataclass(frozen=True)
class FieldSpec:
    """How one dataclass field travels: ``kind`` is one of SCALAR_KINDS, "array", "int_tuple", "str_tuple";
    ``rule`` is its declared ArrayRule or IntRule, if any."""

    name: str
    kind: str
    is_optional: bool
    rule: ArrayRule | IntRule | None = None


SCALAR_KINDS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes"}
_TUPLE_KINDS: dict[type, str] = {int: "int_tuple", str: "str_tuple"}


def _field_kind(owner: type, name: str, annotation: object) -> tuple[str, bool]:
    """Map a type annotation to (field kind, is_optional), refusing anything the wire cannot carry."""
    is_optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1 or len(typing.get_args(annotation)) != 2:
            raise TypeError(f"{owner.__name__}.{name}: only 'X | None' unions are supported")
        is_optional = True
        annotation = members[0]
        origin = typing.get_origin(annotation)
    if annotation in SCALAR_KINDS:
        return SCALAR_KINDS[annotation], is_optional
    if annotation is np.ndarray:
        return "array", is_optional
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in _TUPLE_KINDS:
            return _TUPLE_KINDS[args[0]], is_optional
    raise TypeError(f"{owner.__name__}.{name}: unsupported wire type {annotation!r}")


@dataclass(frozen=True)
class Schema:
    """The decoded layout of one message class."""

    cls: type[Message]
    kind: int
    fields: tuple[FieldSpec, ...]


def schema_of(cls: type[Message]) -> Schema:
    if not (isinstance(cls, type) and issubclass(cls, Message) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a Message dataclass")
    if not isinstance(cls.KIND, int) or not 0 <= cls.KIND <= MAX_KIND:
        raise TypeError(f"{cls.__name__}.KIND must be an int in [0, {MAX_KIND}], got {cls.KIND!r}")
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kind, is_optional = _field_kind(cls, f.name, hints[f.name])
        rule = f.metadata.get(_RULE_KEY)
        if isinstance(rule, ArrayRule) and (kind != "array" or rule.is_optional != is_optional):
            raise TypeError(f"{cls.__name__}.{f.name}: array_field(is_optional={rule.is_optional}) on {hints[f.name]}")
        if isinstance(rule, IntRule) and kind != "int":
            raise TypeError(f"{cls.__name__}.{f.name}: int_field on {hints[f.name]}")
        specs.append(FieldSpec(f.name, kind, is_optional, rule))
    return Schema(cls, cls.KIND, tuple(specs))


class Channel:
    """The message classes of one actor pair, indexed by kind tag and by class.

    Built once at import time of the channel's module; read-only afterwards.
    """

    def __init__(self, name: str, messages: Sequence[type[Message]]) -> None:
        self.name = name
        by_kind: dict[int, Schema] = {}
        by_class: dict[type[Message], Schema] = {}
        for cls in messages:
            schema = schema_of(cls)
            if schema.kind in by_kind:
                other = by_kind[schema.kind].cls.__name__
                raise TypeError(f"channel {name}: kind {schema.kind} used by {other} and {cls.__name__}")
            by_kind[schema.kind] = schema
            by_class[cls] = schema
        self._by_kind = types.MappingProxyType(by_kind)
        self._by_class = types.MappingProxyType(by_class)

    def by_class(self, cls: type) -> Schema | None:
        return self._by_class.get(cls)

    @property
    def message_classes(self) -> tuple[type[Message], ...]:
        return tuple(self._by_class)

    @property
    def request_classes(self) -> tuple[type[Message], ...]:
        """The classes that expect a reply (their REPLY is set)."""
        return tuple(cls for cls in self._by_class if cls.REPLY is not None)

    def __repr__(self) -> str:
        return f"Channel({self.name!r}, {len(self._by_kind)} kinds)"


def require_array(value: object, name: str, *, ndim: int, dtypes: Sequence[str]) -> np.ndarray:
    """Check a message field is an ndarray of the given rank and one of the dtype names; return it."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {value.shape}")
    if _NAME_OF_DTYPE.get(value.dtype) not in dtypes:
        raise ValueError(f"{name} dtype must be one of {', '.join(dtypes)}, got {value.dtype.name}")
    return value


def require_int(value: object, name: str, *, min_value: int = 0, max_value: int = MAX_REQUEST_ID) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not min_value <= value <= max_value:
        raise ValueError(f"{name} must be an integer in [{min_value}, {max_value}], got {value!r}")
    return value
