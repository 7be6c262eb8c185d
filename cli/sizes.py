"""Parsing byte sizes given on the command line: ``256MiB``, ``16GiB``, ``1.5G``, ``4096``, and token counts as
vLLM's options take them: ``4096``, ``4k``, ``32K``.

Every size unit is binary, as memory sizes usually are: K, KB and KiB all mean 1024
bytes (likewise M, G, T); a plain number is bytes.  Sizes above ``MAX_SIZE`` (2**62
bytes, 4 EiB) are refused: they would wrap in the native library's 64-bit sizes.
A token count's suffix is vLLM's (``--max-model-len 32K``): lower case decimal (k = 1000, m, g), upper case
binary (K = 1024, M, G) and then a whole number only.
"""
from __future__ import annotations

import re
from fractions import Fraction

import click

_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: 1 << (10 * power)
    for power, prefix in enumerate("kmgt", start=1)
    for suffix in ("", "b", "ib")
}
MAX_SIZE = 1 << 62
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError with a clear message for anything else (or a size below 1 byte)."""
    if not isinstance(text, str):
        raise ValueError(f"a size must be text like '256MiB', got {text!r}")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size: use a number with an optional unit, e.g. 256MiB or 16GiB")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r}; use KiB, MiB, GiB or TiB (or none for bytes)")
    size = int(Fraction(number) * factor)  # exact: a float would turn 400 digits into inf
    if size < 1:
        raise ValueError(f"size {text!r} is less than one byte")
    if size > MAX_SIZE:
        raise ValueError(f"size {text!r} is more than 2**62 bytes (4 EiB)")
    return size


def format_size(num_bytes: int) -> str:
    """The largest binary unit that keeps the number at least 1: ``format_size(3 << 30) == '3.00 GiB'``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


class SizeParamType(click.ParamType):
    """A click parameter type for sizes: ``@click.option("--kv-memory", type=SIZE)``."""

    name = "size"

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParamType()


_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)([kmgKMG]?)\s*$")


def parse_count(text: str) -> int:
    """A token count as vLLM reads one: ``4096``, ``25.6k`` (25,600), ``32K`` (32,768); ValueError otherwise."""
    match = _COUNT_RE.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a count: use a whole number, or one with k, m or g (powers of "
                         "1000) or K, M or G (powers of 1024), e.g. 4096, 4k or 32K")
    number, suffix = match.groups()
    if suffix.isupper() and "." in number:
        raise ValueError(f"{text!r}: a binary suffix ({suffix}) takes a whole number; did you mean "
                         f"{number}{suffix.lower()}?")
    factor = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suffix]
    count = Fraction(number) * factor
    if count.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of tokens")
    return int(count)


class CountParamType(click.ParamType):
    """A click parameter type for token counts (``parse_count``), at least ``min``."""

    name = "count"

    def __init__(self, min: int = 0) -> None:  # noqa: A002 - click.IntRange's name
        self.min = min

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        try:
            count = value if isinstance(value, int) and not isinstance(value, bool) else parse_count(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if count < self.min:
            self.fail(f"{value!r} is less than {self.min}", param, ctx)
        return count
