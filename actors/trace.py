"""Step trace: when the GPU (dense work) and each KV node (attention) were busy.

Recording is off unless asked for; when on, each interval is one small tuple
appended to a list. ``write`` dumps JSON that ``fdctl trace-plot`` renders.
"""
from __future__ import annotations

import json
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
