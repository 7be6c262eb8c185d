"""The decode step as the Executor runs it, predicted from the node and GPU models.

The Executor runs each mini-batch as a chain of ``2 * num_layers + 1`` stages:
a dense call (embedding and layer 0's QKV), then per layer an attend round (one
call to every node holding some of the mini-batch's sequences, in parallel) and
a dense call (that layer's O-projection and MLP, then the next layer's QKV, or
the LM head after the last layer).  With two mini-batches the chains run
concurrently and share one dense thread and each node; with one (or the
pipeline off) the chain runs alone.

A stage's duration:
- dense call of a mini-batch of ``n`` sequences: ``T(n) / (num_layers + 1)``
  (the GPU model's whole dense pass spread over the calls) plus
  ``call_overhead_s``, the Executor's own cost per dense call that the start-up
  sweep does not see (handing work to the dense thread and back, staging
  activations, Python per layer);
- attend call on a node: the node's time model at the mini-batch's context on
  it.  The Executor feeds that model the attend round trips it measures, so it
  predicts the call as seen from the Executor: wire, queueing and message
  handling included, not just the native kernel.

A mini-batch held wholly on a node with a ``whole_step`` model (the GPU KV node,
whose step is one CUDA graph: every layer's dense part and attention) is one
stage instead: that model's time for its sequence count, on the dense thread.
Measured steps made only of such mini-batches teach those models (each its
predicted share of the step, as the median of the latest ``_WHOLE_STEP_WINDOW``
steps of that size, so one step stalled by the host does not move it); the
others teach ``call_overhead_s`` as below.

The step is simulated with each resource (the dense thread, each node) serving
stages in order of readiness, so two mini-batches on one node wait for each
other there and the pipeline's fill and drain are counted.  The nodes' models
must therefore hold each call's service time, not its round trip: a round trip
of the second mini-batch's call includes the wait for the first's, which the
simulation adds again (``Scheduler.observe_attend_calls`` takes that wait out).

``call_overhead_s`` is learned online from measured decode steps.  Each step
gives a target: the value that would have predicted it exactly.  Over the first
``1 / update_rate`` steps the overhead is the median of their targets (one odd
first step does not set it); after that each step moves it by ``update_rate``
towards its target, the move capped at ``max_relative_move`` times the current
overhead (or, while that is tiny, a tenth of the step per dense call on its
critical path).  The cap makes the learning robust: a step stalled by something
else on the host moves the prediction little, so the model tracks the typical
step, not a mean dragged up by outliers.
"""
from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import ErrorTracker, _check_rate, _check_time

DenseTime = Callable[[float], float]  # sequences -> seconds of a whole dense pass (all layers)

_SLOPE_PROBE_S = 1e-6  # finite-difference step for d(step)/d(call_overhead)
_MIN_SCALE_SHARE = 0.1  # the cap's scale never falls below this share of the step per critical dense call
_WHOLE_STEP_WINDOW = 5  # a whole-step model learns from the median of this many latest steps of a batch size


@dataclass(frozen=True)
class MiniBatchLoad:
    """One mini-batch as the step model sees it: its size and its context (tokens) on each node."""

    num_seqs: int
    context_by_node: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_seqs < 0:
            raise ValueError(f"num_seqs must be >= 0, got {self.num_seqs}")
        if any(c < 0 for c in self.context_by_node.values()):
            raise ValueError("context lengths must be >= 0")


class DecodeStepModel:
    """Predicted seconds of one decode step for one or two concurrent mini-batches."""

    def __init__(
        self, nodes: Mapping[int, NodeModel], num_layers: int, dense_time: DenseTime | None = None,
        *, update_rate: float = 0.2, call_overhead_s: float = 0.0, max_relative_move: float = 0.5,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if call_overhead_s < 0:
            raise ValueError(f"call_overhead_s must be >= 0, got {call_overhead_s}")
        if not max_relative_move > 0:
            raise ValueError(f"max_relative_move must be > 0, got {max_relative_move}")
        self.nodes = nodes  # read at each prediction: nodes may come and go, their models learn
        self.num_layers = num_layers
        self.dense_time = dense_time
        self.call_overhead_s = float(call_overhead_s)
        self._rate = _check_rate(update_rate)
        self._max_relative_move = float(max_relative_move)
        self._num_warmup_steps = round(1.0 / self._rate)
        self._warmup_targets: list[float] = []
        self.errors = ErrorTracker(update_rate)
        self._whole_step_recent: dict[tuple[int, int], deque[float]] = {}  # (node, batch) -> measured shares

    def dense_call_s(self, num_seqs: float, call_overhead_s: float | None = None) -> float:
        """One dense call of a mini-batch of ``num_seqs`` sequences, Executor overhead included."""
        if num_seqs <= 0:
            return 0.0
        dense = self.dense_time(num_seqs) if self.dense_time else 0.0
        overhead = self.call_overhead_s if call_overhead_s is None else call_overhead_s
        return dense / (self.num_layers + 1) + overhead

    def dense_step_s(self, num_seqs: float) -> float:
        """All ``num_layers + 1`` dense calls of one mini-batch (what the mini-batch split weighs)."""
        return (self.num_layers + 1) * self.dense_call_s(num_seqs)

    def predict(self, minibatches: Sequence[MiniBatchLoad]) -> float:
        """Seconds of a decode step running ``minibatches`` (1 or 2) concurrently."""
        return self._simulate(minibatches, self.call_overhead_s)

    def predict_unsplit(self, num_seqs: int, context_by_node: Mapping[int, float], *,
                        is_single_allowed: bool = True) -> float:
        """Seconds of a step of ``num_seqs`` sequences holding ``context_by_node`` tokens, not yet split: two
        mini-batches of half the sequences and half of each node's context each (what the split aims at), or
        one where ``is_single_allowed`` and that is faster. For a load that does not run yet (admission's peak)."""
        if num_seqs < 1:
            return 0.0
        halves = [MiniBatchLoad(n, {i: c * n / num_seqs for i, c in context_by_node.items()})
                  for n in ((num_seqs + 1) // 2, num_seqs // 2)]
        step_s = self.predict(halves)
        if is_single_allowed and num_seqs > 1:
            step_s = min(step_s, self.predict([MiniBatchLoad(num_seqs, dict(context_by_node))]))
        return step_s

    def observe(self, minibatches: Sequence[MiniBatchLoad], seconds: float, *,
                is_device_time_included: bool = True) -> float:
        """Learn from a measured step; returns the relative error of the prediction made before.
        ``is_device_time_included=False``: the measurement may end before a one-call step's device
        work does (an asynchronous CUDA graph launch), so it teaches no whole-step model."""
        seconds = _check_time(seconds, "seconds")
        predicted = self._simulate(minibatches, self.call_overhead_s)
        error = self.errors.record(predicted, seconds)
        whole = [(mb, self._whole_step_node(mb)) for mb in minibatches if mb.num_seqs > 0]
        if whole and all(node is not None for _, node in whole):
            if not is_device_time_included:
                return error
            # one call per mini-batch, one after the other on the dense thread: each learns its share
            shares = [node.whole_step.predict(mb.num_seqs) for mb, node in whole]
            for (mb, node), share in zip(whole, shares):
                recent = self._whole_step_recent.setdefault((node.node_id, mb.num_seqs),
                                                            deque(maxlen=_WHOLE_STEP_WINDOW))
                recent.append(seconds * (share / sum(shares) if sum(shares) > 0 else 1.0))
                node.whole_step.observe(mb.num_seqs, statistics.median(recent))
            return error
        slope = (self._simulate(minibatches, self.call_overhead_s + _SLOPE_PROBE_S) - predicted) / _SLOPE_PROBE_S
        if slope <= 0:
            return error
        target = max(0.0, self.call_overhead_s + (seconds - predicted) / slope)
        if len(self._warmup_targets) < self._num_warmup_steps:
            self._warmup_targets.append(target)
            self.call_overhead_s = statistics.median(self._warmup_targets)
            return error
        cap = self._max_relative_move * max(self.call_overhead_s, _MIN_SCALE_SHARE * predicted / slope)
        move = min(max(target - self.call_overhead_s, -cap), cap)
        self.call_overhead_s = max(0.0, self.call_overhead_s + self._rate * move)
        return error

    def _whole_step_node(self, mb: MiniBatchLoad) -> NodeModel | None:
        """The node that runs ``mb`` as one call: it holds all of it and has a whole-step model."""
        if len(mb.context_by_node) != 1:
            return None
        node = self.nodes[next(iter(mb.context_by_node))]
        return node if node.whole_step is not None else None

    def _chain(self, mb: MiniBatchLoad, call_overhead_s: float) -> tuple[float, dict[int, float], int]:
        """A mini-batch's stages: (seconds of each dense call, attend seconds per node, number of stages)."""
        node = self._whole_step_node(mb)
        if node is not None:  # one dense-thread call does the whole step
            return node.whole_step.predict(mb.num_seqs), {}, 1
        return (self.dense_call_s(mb.num_seqs, call_overhead_s),
                {n: self.nodes[n].predict_attend_s(c) for n, c in mb.context_by_node.items() if c > 0},
                2 * self.num_layers + 1)

    def _simulate(self, minibatches: Sequence[MiniBatchLoad], call_overhead_s: float) -> float:
        if len(minibatches) > 2:
            raise ValueError(f"the Executor runs one or two mini-batches, got {len(minibatches)}")
        chains = [self._chain(mb, call_overhead_s) for mb in minibatches if mb.num_seqs > 0]
        if len(chains) == 1:  # nothing to wait for: the stages add up (the same sums as the simulation)
            dense_s, attend_s, num_stages = chains[0]
            if num_stages == 1:
                return dense_s
            attend_max = max(attend_s.values(), default=0.0)
            end = 0.0
            for _ in range(self.num_layers):
                end += dense_s
                end += attend_max
            return end + dense_s
        num_chains = len(chains)
        ready = [0.0] * num_chains
        stage = [0] * num_chains
        dense_free = 0.0
        node_free: dict[int, float] = {}
        while True:
            i = -1  # the active chain ready first (the lower index on a tie)
            for j in range(num_chains):
                if stage[j] < chains[j][2] and (i < 0 or ready[j] < ready[i]):
                    i = j
            if i < 0:
                return max(ready, default=0.0)
            dense_s, attend_s, _ = chains[i]
            if stage[i] % 2 == 0:  # a dense call on the one dense thread
                dense_free = max(ready[i], dense_free) + dense_s
                ready[i] = dense_free
            else:  # an attend round: every node of the mini-batch, in parallel, each in its own order
                end = ready[i]
                for node_id, seconds in attend_s.items():
                    node_free[node_id] = max(ready[i], node_free.get(node_id, 0.0)) + seconds
                    end = max(end, node_free[node_id])
                ready[i] = end
            stage[i] += 1
