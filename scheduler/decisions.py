"""What the scheduler tells the Executor each step: typed, immutable decisions."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Admission:
    """Start (or resume) a sequence: prefill ``num_prefill_tokens`` tokens, KV on ``node_id``.

    For a fresh sequence that is its prompt (``num_generated == 0``) and the
    prefill samples its first token.  For one that was preempted it is the
    prompt followed by the tokens it produced but the last one
    (``prompt + num_generated - 1``) and nothing is sampled: the next decode step
    feeds the last token and samples the next, as if it had never left.
    """

    seq_id: int
    node_id: int
    minibatch: int
    num_prefill_tokens: int
    num_generated: int

    @property
    def is_resumed(self) -> bool:
        return self.num_generated > 0


@dataclass(frozen=True)
class Preemption:
    """Free ``seq_id``'s KV on ``node_id``; the scheduler has requeued it with its progress."""

    seq_id: int
    node_id: int
    num_generated: int


@dataclass(frozen=True)
class StepPlan:
    """One step: who is preempted, who starts, and the two mini-batches of running sequences.

    ``minibatches`` include the sequences admitted this step.  ``predicted_step_s``
    is the predicted pipelined decode step time (0 when no GPU model is known
    and the nodes predict nothing) of the split's per-layer cycle model.  The step
    model's prediction as the Executor measures it is ``Scheduler.predict_decode_s``
    of the groups the Executor runs (not computed here: it costs time every step).
    ``total_context`` is the sum of the running sequences' context lengths.
    """

    step_index: int
    preempted: tuple[Preemption, ...]
    admitted: tuple[Admission, ...]
    minibatches: tuple[tuple[int, ...], tuple[int, ...]]
    predicted_step_s: float
    total_context: int

    @property
    def num_running(self) -> int:
        return len(self.minibatches[0]) + len(self.minibatches[1])
