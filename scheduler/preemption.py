"""Preemption: which sequences leave a node that is out of memory.

The victim is the youngest sequence on the node: the latest admitted, where a
sequence that was preempted before counts by its first arrival (so the same
sequence is not picked again and again).  The caller frees the victim's KV and
the scheduler requeues it; it is prefilled again later with its prompt and the
tokens it already produced, so its output does not change.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """A running sequence on a node, as preemption sees it."""

    seq_id: int
    arrival_index: int
    num_pages: int  # pages it needs for the coming step


def youngest(residents: Iterable[Resident]) -> Resident | None:
    """The resident that arrived last (highest arrival index), None for an empty node."""
    return max(residents, key=lambda r: (r.arrival_index, r.seq_id), default=None)


def choose_victims(residents: Sequence[Resident], num_pages: int) -> list[int]:
    """Youngest-first victims until the rest fit in ``num_pages``; [] if they already fit.

    If even the oldest alone does not fit it is chosen too (every resident is a
    victim), so the caller never runs a step that overflows the node.
    """
    needed = sum(r.num_pages for r in residents)
    victims: list[int] = []
    for resident in sorted(residents, key=lambda r: (r.arrival_index, r.seq_id), reverse=True):
        if needed <= num_pages:
            break
        victims.append(resident.seq_id)
        needed -= resident.num_pages
    return victims
