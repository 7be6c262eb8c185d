"""Step trace: when the GPU (dense work) and each KV node (attention) were busy.

Recording is off unless asked for; when on, each interval is one small tuple
appended to a list. ``write`` dumps JSON that ``fdctl trace-plot`` renders.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total time covered by possibly overlapping intervals (two mini-batches in
    flight on one node count once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@dataclass
class StepTrace:
    """Busy intervals, seconds since the trace started."""

    origin_s: float = field(default_factory=time.perf_counter)
    # (step, minibatch, lane, kind, start_s, end_s); lane is "gpu" or a node id
    intervals: list[tuple[int, int, str, str, float, float]] = field(default_factory=list)
    steps: list[tuple[int, float, float, int]] = field(default_factory=list)  # (step, start, end, batch)

    def now(self) -> float:
        return time.perf_counter() - self.origin_s

    def add(self, step: int, minibatch: int, lane: str, kind: str, start_s: float, end_s: float) -> None:
        self.intervals.append((step, minibatch, lane, kind, start_s, end_s))

    def add_step(self, step: int, start_s: float, end_s: float, batch_size: int) -> None:
        self.steps.append((step, start_s, end_s, batch_size))

    def summary(self) -> dict:
        """Busy fractions over the decode steps and the overlap figure.

        overlap = (GPU busy + busiest node's busy) / (2 x wall): 0.5 when the two
        sides strictly alternate, 1.0 when both are busy all the time.
        """
        wall = sum(end - start for _, start, end, _ in self.steps)
        by_lane: dict[str, list[tuple[float, float]]] = {}
        for _, _, lane, _, start, end in self.intervals:
            by_lane.setdefault(lane, []).append((start, end))
        busy = {lane: union_length(spans) for lane, spans in by_lane.items()}
        gpu = busy.pop("gpu", 0.0)
        node_max = max(busy.values(), default=0.0)
        return {
            "num_steps": len(self.steps),
            "wall_s": wall,
            "gpu_busy_s": gpu,
            "node_busy_s": busy,
            "overlap": (gpu + node_max) / (2 * wall) if wall > 0 else None,
        }

    def layer_breakdown(self) -> dict[str, float]:
        """Median milliseconds of one mini-batch's layer cycle on the shard path, from the intervals.

        Per (step, mini-batch) the intervals alternate: dense work on the GPU lane, then one attend per
        node. ``dense_ms``: a dense call; ``to_nodes_ms``: dense end to the first attend's start (the
        host copy and the hops); ``attend_ms``: first attend start to last attend end (what the nodes
        and the wire take); ``back_ms``: last attend end to the next dense start (joining, the upload
        and waiting for the dense thread). Empty when the trace has no attend intervals (one-call steps).
        """
        cycles: dict[str, list[float]] = {"dense_ms": [], "to_nodes_ms": [], "attend_ms": [], "back_ms": []}
        by_minibatch: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
        for step, minibatch, lane, kind, start, end in self.intervals:
            by_minibatch.setdefault((step, minibatch), []).append((start, end, lane))
        for events in by_minibatch.values():
            events.sort()
            dense_end: float | None = None
            attends: list[tuple[float, float]] = []
            for start, end, lane in events:
                if lane != "gpu":
                    attends.append((start, end))
                    continue
                if dense_end is not None and attends:
                    first, last = min(a for a, _ in attends), max(b for _, b in attends)
                    cycles["to_nodes_ms"].append(first - dense_end)
                    cycles["attend_ms"].append(last - first)
                    cycles["back_ms"].append(start - last)
                cycles["dense_ms"].append(end - start)
                dense_end, attends = end, []
        if not cycles["attend_ms"]:
            return {}
        return {name: 1e3 * statistics.median(values) for name, values in cycles.items()}

    def to_json(self) -> dict:
        return {
            "intervals": [
                {"step": s, "minibatch": m, "lane": lane, "kind": k, "start_s": a, "end_s": b}
                for s, m, lane, k, a, b in self.intervals
            ],
            "steps": [{"step": s, "start_s": a, "end_s": b, "batch_size": n} for s, a, b, n in self.steps],
            "summary": self.summary(),
        }

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f)
