"""Mini-batch split: which running sequences go in mini-batch A (0) and which in B (1).

With two mini-batches the GPU runs one's dense part while the shards attend
for the other, layer after layer.  Per layer, with ``g_m`` the GPU time of
mini-batch m (dense step of its sequence count, divided by the layers) and
``s_m`` its attention time (the slowest node's attend call over that node's
context in m; nodes work in parallel), the cycle of the two-stage pipeline is

    cycle = max(g_A + g_B,                    # the GPU does both dense parts
                max_node(s_A,n + s_B,n),      # each node attends for both
                g_A + s_A, g_B + s_B)         # each mini-batch waits for itself

and one decode step takes ``num_layers * cycle``.  It is bubble-free when
``g_A = s_B`` and ``g_B = s_A``; balanced halves minimise the cycle.

The split keeps each sequence in its mini-batch from step to step; new
sequences join the half where they lengthen the cycle least.  When a fresh
split (per node, sequences by context, longest first, each to the half with
less context on that node, ties to the half with fewer sequences) would make
the step at least ``rebalance_threshold`` faster, it replaces the current one.
Moving a sequence is free: its KV stays on its node, only its turn changes.

A single mini-batch is also a candidate: for a small batch with short
contexts the GPU step is weight-bound and barely depends on the count, so
reading the weights once (everything in A, B empty, no overlap) beats reading
them twice.  The caller must accept an empty mini-batch.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from fastdecode.scheduler.node import NodeModel


class SplitItem(NamedTuple):
    """A running sequence as the split sees it (a named tuple: one is made per sequence every step)."""

    seq_id: int
    node_id: int
    context_len: int
    minibatch: int | None = None  # None for a sequence not yet assigned


DenseTime = Callable[[float], float]  # sequences -> seconds of a whole dense step (all layers)


class StepTimeModel:
    """Predicts the pipelined decode step time of a split from the node and GPU models."""

    def __init__(self, nodes: Mapping[int, NodeModel], num_layers: int, dense_time: DenseTime | None = None) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.nodes = nodes
        self.num_layers = num_layers
        self.dense_time = dense_time

    def layer_times(
        self, counts: Sequence[float], contexts: Sequence[Mapping[int, float]]
    ) -> tuple[list[float], list[dict[int, float]]]:
        """Per mini-batch: GPU seconds per layer, and per node attend seconds."""
        gpu = [self.dense_time(n) / self.num_layers if self.dense_time and n else 0.0 for n in counts]
        attend = [{i: self.nodes[i].predict_attend_s(c) for i, c in ctx.items()} for ctx in contexts]
        return gpu, attend

    def cycle_s(self, counts: Sequence[float], contexts: Sequence[Mapping[int, float]]) -> float:
        """Seconds per layer of the two-mini-batch pipeline (see the module docstring)."""
        gpu, attend = self.layer_times(counts, contexts)
        slowest = [max(a.values(), default=0.0) for a in attend]
        per_node = max((attend[0].get(i, 0.0) + attend[1].get(i, 0.0) for i in self.nodes), default=0.0)
        return max(gpu[0] + gpu[1], per_node, gpu[0] + slowest[0], gpu[1] + slowest[1])

    def step_s(self, items: Sequence[SplitItem], assignment: Mapping[int, int]) -> float:
        counts, contexts = _tally(items, assignment)
        return self.num_layers * self.cycle_s(counts, contexts)


def _tally(items: Sequence[SplitItem], assignment: Mapping[int, int]) -> tuple[list[int], list[dict[int, int]]]:
    counts = [0, 0]
    contexts: list[dict[int, int]] = [{}, {}]
    for item in items:
        half = assignment[item.seq_id]
        counts[half] += 1
        contexts[half][item.node_id] = contexts[half].get(item.node_id, 0) + item.context_len
    return counts, contexts


def fresh_split(items: Sequence[SplitItem]) -> dict[int, int]:
    """Balanced split from scratch: per node, longest context first, into the lighter half on that node."""
    assignment: dict[int, int] = {}
    counts = [0, 0]
    by_node: dict[int, list[SplitItem]] = {}
    for item in items:
        by_node.setdefault(item.node_id, []).append(item)
    for node_id in sorted(by_node):
        load = [0, 0]
        for item in sorted(by_node[node_id], key=lambda it: (-it.context_len, it.seq_id)):
            half = min((0, 1), key=lambda h: (load[h], counts[h], h))
            assignment[item.seq_id] = half
            load[half] += item.context_len
            counts[half] += 1
    return assignment


def split_minibatches(
    items: Sequence[SplitItem], model: StepTimeModel, rebalance_threshold: float, *,
    is_single_allowed: bool = True,
) -> tuple[dict[int, int], float]:
    """Assign every item to mini-batch 0 or 1: keep the current split, place newcomers, re-split if worth it.

    Returns the assignment (seq_id -> 0 or 1) and its predicted step time. With
    ``is_single_allowed`` False (the pipeline is asked for), two or more items always
    fill both mini-batches.
    """
    assignment, step_s = _split(items, model, rebalance_threshold, is_single_allowed)
    if not is_single_allowed and len(items) > 1 and len(set(assignment.values())) < 2:
        assignment = fresh_split(items)
        step_s = model.step_s(items, assignment)
    return assignment, step_s


def _split(items: Sequence[SplitItem], model: StepTimeModel, rebalance_threshold: float,
           is_single_allowed: bool) -> tuple[dict[int, int], float]:
    assignment = {it.seq_id: it.minibatch for it in items if it.minibatch in (0, 1)}
    newcomers = [it for it in items if it.seq_id not in assignment]
    kept = [it for it in items if it.seq_id in assignment]
    counts, contexts = _tally(kept, assignment)
    for item in sorted(newcomers, key=lambda it: (-it.context_len, it.seq_id)):
        best_half, best_cycle = 0, float("inf")
        for half in (0, 1):
            counts[half] += 1
            contexts[half][item.node_id] = contexts[half].get(item.node_id, 0) + item.context_len
            cycle = model.cycle_s(counts, contexts)
            counts[half] -= 1
            contexts[half][item.node_id] -= item.context_len
            if cycle < best_cycle - 1e-15 or (cycle <= best_cycle + 1e-15 and counts[half] < counts[best_half]):
                best_half, best_cycle = half, cycle
        assignment[item.seq_id] = best_half
        counts[best_half] += 1
        contexts[best_half][item.node_id] = contexts[best_half].get(item.node_id, 0) + item.context_len
    current_s = model.num_layers * model.cycle_s(counts, contexts)
    even_s, single_s = _reference_step_s(items, model)
    best_reference_s = min(even_s, single_s) if is_single_allowed else even_s
    if current_s <= best_reference_s * (1.0 + rebalance_threshold):
        return assignment, current_s  # already about as good as it gets
    candidates = [fresh_split(items)]
    if is_single_allowed:
        candidates.append({it.seq_id: 0 for it in items})
    best_s, best = min((model.step_s(items, c), index) for index, c in enumerate(candidates))
    if best_s <= current_s * (1.0 - rebalance_threshold):
        return candidates[best], best_s
    return assignment, current_s


def _reference_step_s(items: Sequence[SplitItem], model: StepTimeModel) -> tuple[float, float]:
    """Step times of a perfectly even split (half the count and of each node's context) and of one mini-batch."""
    total: dict[int, int] = {}
    for item in items:
        total[item.node_id] = total.get(item.node_id, 0) + item.context_len
    halves = [{i: c / 2 for i, c in total.items()}] * 2
    even = model.cycle_s([len(items) / 2] * 2, halves)
    single = model.cycle_s([len(items), 0], [total, {}])
    return model.num_layers * even, model.num_layers * single
