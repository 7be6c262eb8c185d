"""Attend round trips as the caller measured them, turned into each node's service time per call.

With two mini-batches on one node, the second mini-batch's call often starts while
the first's is still on the node: its round trip then includes the wait for the
first call.  The step model (``step_model.py``) queues calls on a node itself, so
a node's time model must learn the time the node spent on each call, not the
round trip, or the wait is counted twice.

A node finishes its calls one after the other; taken in the order they ended,
a call's service time is the time from its start, or from the end of the node's
previous call if that was later, to its end::

    service_i = end_i - max(start_i, end_{i-1})

Calls that never overlap keep their whole round trip.  Re-simulating a step with
these service times puts every call's end where it was measured.

The caller stamps a call's end when it first sees the reply waiting.  Calls of one
node stamped with the same clock reading were all done by then, but how the node
split that time between them is not known (giving the last one ``end - end`` = 0
would be a time of nothing for its bytes): they become one observation, their mean
call, with their mean bytes and their joint service time divided by their number,
which a time linear in bytes predicts exactly.

Pure arithmetic on the caller's clock readings (any monotonic clock, seconds).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

MIN_SERVICE_S = 1e-9  # a call ending on the clock reading it started at (or its predecessor ended at)


def _check_finite(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class AttendCall:
    """One measured attend call: the node, the KV bytes it read, and when it started and ended."""

    node_id: int
    kv_bytes: float
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        _check_finite(self.kv_bytes, "kv_bytes")
        _check_finite(self.start_s, "start_s")
        _check_finite(self.end_s, "end_s")
        if self.kv_bytes < 0:
            raise ValueError(f"kv_bytes must be >= 0, got {self.kv_bytes!r}")
        if self.end_s < self.start_s:
            raise ValueError(f"an attend call cannot end before it starts, got {self.start_s!r} .. {self.end_s!r}")


def service_times(calls: Iterable[AttendCall]) -> list[tuple[AttendCall, float]]:
    """Each call with the seconds its node spent on it, grouped by node, in the order they ended.

    Calls of one node that ended at the same clock reading come back as one call (their mean
    call: mean bytes, the earliest start, that end) with their mean service time.
    """
    by_end: dict[tuple[int, float], list[AttendCall]] = {}
    for call in calls:
        by_end.setdefault((call.node_id, call.end_s), []).append(call)
    result: list[tuple[AttendCall, float]] = []
    previous_end: dict[int, float] = {}
    for (node_id, end_s), group in sorted(by_end.items()):
        start_s = min(c.start_s for c in group)
        joint_s = end_s - max(start_s, previous_end.get(node_id, -math.inf))
        previous_end[node_id] = end_s
        call = group[0] if len(group) == 1 else AttendCall(
            node_id, sum(c.kv_bytes for c in group) / len(group), start_s, end_s)
        result.append((call, max(joint_s / len(group), MIN_SERVICE_S)))
    return result
