"""Admission: how many waiting sequences may start this step.

Two modes, both bounded by ``max_num_seqs`` (and by memory, which the caller
checks through placement):

- ``"all-at-once"``: fill every free slot now.  Sequences started together grow
  together, so the total context (and the attention time) ramps up to a peak
  of about ``B * (prompt + output)`` before the cohort finishes.
- ``"sls"``, sequence-level load stabilisation: admit ``g`` sequences every
  ``k`` steps, at the steady rate ``r = g / k = B / expected_output_len`` that
  keeps B sequences running with ages spread evenly over their lifetime.  The
  total context then stays flat at about ``B * (prompt + output / 2)``, roughly
  half the all-at-once peak for long outputs.  A cold start ramps up at that rate
  (B running after one expected output length), rather than all at once.  On
  top of the rate, a group is only admitted while the predicted peak of the
  total context (each live sequence growing by one token per step until its
  expected end, plus the group) stays under a limit, by default the steady
  state's total plus ``sls_load_headroom``.  Below ``sls_free_load`` of the batch
  (running plus waiting sequences) there is nothing to stabilise: every waiting
  sequence starts at once, as in ``"all-at-once"``, still under the context limit.
  SLS levels the attention time, so it paces only where attention bounds the
  step: when the caller's step model (``predict_step_s``) predicts the step at
  the predicted peak (live sequences grown to their expected ends, plus every
  candidate) more than ``sls_attention_margin`` slower than the same step with
  no context, i.e. attention is neither hidden under the pipeline's dense part
  nor small against it.  Otherwise every candidate starts at once, outside the
  rate and the derived limit (an explicit ``max_total_context`` still holds).
A derived limit makes room for the batch's longest sequence beside B - 1 steady
shares, so one long request does not hold the batch down while it runs.
Sequences that already generated tokens (preempted for room, or requeued off a
failed or draining node) were part of the steady load: those at the head of the
queue start outside the rate and the limit, as soon as placement finds room.

The plan is redone as sequences finish: the expected output length is the
mean ``max_tokens`` of arrivals times the observed fraction of ``max_tokens``
that finished sequences used (EWMA, the first samples weighing 1/n).  Early
finishes (EOS before ``max_tokens``) lower it, which raises the rate ``r`` so
that B sequences stay running, and lower the context limit and each live
sequence's expected remaining steps to match.  Freed slots are refilled at
the rate, not at once: refilling every slot as it frees would keep whatever
age structure the batch has (a cohort stays a cohort), while the steady rate
spreads the ages out again.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Protocol

from fastdecode.scheduler.config import SchedulerConfig

# (sequences, their context in tokens by node: None for those not placed yet) -> seconds of a decode step
StepPredictor = Callable[[int, Mapping[int | None, float]], float]


class _Seq(Protocol):
    """What admission reads of a sequence (``SequenceRecord`` is one)."""

    @property
    def context_len(self) -> int: ...

    num_generated: int
    max_tokens: int


def predicted_peak_and_step(items: Iterable[tuple[int, int]], horizon: int | None = None) -> tuple[int, int]:
    """Peak total context of (context_len, num_remaining_steps) items over the next ``horizon`` steps, and the step
    (from now) at which the total reaches it.

    Each item grows by one token per step and leaves after its remaining steps; the total is highest just before
    some item leaves or at the horizon, so only those instants are checked.  ``horizon=None`` looks until the last
    one leaves.

    Without a horizon, the total at that step is the sum of ``context_len + step`` over the items with more than
    ``step`` remaining steps (items have at least one), so taking some items out lowers it by theirs alone.
    """
    ordered = sorted(items, key=itemgetter(1), reverse=True)
    peak = 0
    peak_step = 0
    context_sum = 0
    count = 0
    for index, (context_len, num_remaining) in enumerate(ordered):
        context_sum += context_len
        count += 1
        is_last_of_tie = index + 1 == len(ordered) or ordered[index + 1][1] != num_remaining
        if is_last_of_tie:
            steps = max(num_remaining - 1, 0)
            if horizon is not None:
                steps = min(steps, horizon)
            if context_sum + steps * count > peak:
                peak, peak_step = context_sum + steps * count, steps
    return peak, peak_step


class _RunningMean:
    """Exponentially weighted mean whose first samples weigh 1/n (no bias towards a start value)."""

    def __init__(self, rate: float, initial: float | None = None) -> None:
        self._rate = rate
        self._count = 0
        self.value = initial

    def add(self, sample: float) -> None:
        self._count += 1
        weight = max(self._rate, 1.0 / self._count)
        self.value = sample if self.value is None or self._count == 1 else self.value + weight * (sample - self.value)


class AdmissionPolicy:
    """Decides how many of the waiting sequences (taken in order) to admit each step."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._prompt_len = _RunningMean(config.estimate_rate)
        self._max_tokens = _RunningMean(config.estimate_rate)
        self._completion = _RunningMean(config.estimate_rate, initial=1.0)  # fraction of max_tokens used
        self._credit = 0.0

    # --- estimates -----------------------------------------------------------------
    @property
    def expected_output_len(self) -> float:
        """Expected tokens a sequence generates: mean max_tokens times the observed fraction used."""
        if self._max_tokens.value is None:
            return 1.0
        return max(1.0, self._max_tokens.value * self._completion.value)

    @property
    def rate_per_step(self) -> float:
        """SLS steady admission rate r = B / expected output length (sequences per step)."""
        return self.config.max_num_seqs / self.expected_output_len

    @property
    def group_size(self) -> int:
        """g: sequences admitted together."""
        return max(self.config.sls_min_group_size, round(self.rate_per_step))

    @property
    def steps_between_groups(self) -> float:
        """k = g / r: steps between two groups in the steady state."""
        return self.group_size / self.rate_per_step

    @property
    def context_limit(self) -> int | None:
        """Limit on the predicted total context (tokens), None before the first arrival."""
        if self.config.max_total_context is not None:
            return self.config.max_total_context
        if self._prompt_len.value is None:
            return None
        steady = self.config.max_num_seqs * (self._prompt_len.value + self.expected_output_len / 2.0)
        return math.ceil(steady * (1.0 + self.config.sls_load_headroom))

    def expected_remaining(self, seq: _Seq) -> int:
        """Steps a sequence is expected to run still (at least 1, at most to max_tokens)."""
        expected_total = min(seq.max_tokens, math.ceil(seq.max_tokens * self._completion.value - 1e-9))
        return max(1, expected_total - seq.num_generated)

    # --- events --------------------------------------------------------------------
    def on_arrival(self, prompt_len: int, max_tokens: int) -> None:
        self._prompt_len.add(prompt_len)
        self._max_tokens.add(max_tokens)

    def on_finish(self, num_generated: int, max_tokens: int) -> None:
        """A sequence finished after ``num_generated`` of its ``max_tokens``: re-plan."""
        self._completion.add(min(1.0, max(num_generated, 1) / max_tokens))

    def on_admitted(self, admitted: Sequence[_Seq]) -> None:
        """``admitted`` started: the new ones use up credit; resumed ones (``num_generated`` > 0), which
        ``num_to_admit`` lets through outside the rate, do not: they were already part of the load."""
        num_new = sum(1 for seq in admitted if seq.num_generated == 0)
        self._credit = max(0.0, self._credit - num_new)

    # --- decision ------------------------------------------------------------------
    def num_to_admit(self, running: Sequence[_Seq], waiting: Sequence[_Seq],
                     predict_step_s: StepPredictor | None = None) -> int:
        """How many sequences from the head of ``waiting`` to admit this step (call once per step).
        ``predict_step_s``: the decode step's time model; without it SLS paces whatever the step's bound."""
        num_slots = max(0, self.config.max_num_seqs - len(running))
        num_candidates = min(num_slots, len(waiting))
        if self.config.admission == "all-at-once":
            return num_candidates
        group = self.group_size
        if not running:
            self._credit = max(self._credit, float(group))  # cold start: the first group goes at once
        else:
            self._credit = min(self._credit + self.rate_per_step, self._credit_cap())
        if not num_candidates:
            return 0
        live = [(s.context_len, self.expected_remaining(s)) for s in running]
        candidates = [(s.context_len, self.expected_remaining(s)) for s in waiting[:num_candidates]]
        # attention does not bound the step (nothing to level), or the load is light: every candidate at once
        is_light = self._is_attention_light(running, live, candidates, predict_step_s)
        if is_light or len(running) + len(waiting) <= self.config.sls_free_load * self.config.max_num_seqs:
            num = num_candidates
        else:
            num = min(num_candidates, group * math.floor(self._credit / group))
        num_resumed = next((i for i, s in enumerate(waiting[:num_candidates]) if s.num_generated == 0),
                           num_candidates)
        limit = self.config.max_total_context if is_light else self.context_limit
        if num == 0 or limit is None:
            return max(num, num_resumed)
        del candidates[num:]
        # the longest item with the first i candidates in, for each i
        longest = list(itertools.accumulate((context_len + remaining - 1 for context_len, remaining in candidates),
                                            max, initial=max((c + r - 1 for c, r in live), default=0)))
        # Whether the first ``num`` candidates fit is not monotone in ``num`` (the longest raises a derived limit),
        # so each ``num`` is tried from the top down, but the peak is not recomputed for each: the total at the step
        # of the last computed peak, less what the candidates taken out since then added at that step, is a lower
        # bound of the peak, and while that bound is over the limit the candidates cannot fit.
        bound, peak_step = 0, 0  # nothing computed yet: 0 bounds any peak
        while num > 0:
            allowed = self._limit_with(limit, longest[num])
            if bound <= allowed:
                bound, peak_step = predicted_peak_and_step(live + candidates[:num])
                if bound <= allowed:
                    break
            context_len, num_remaining = candidates[num - 1]
            if num_remaining > peak_step:
                bound -= context_len + peak_step
            num -= 1
        if num == 0 and not running:
            num = 1  # never stall an idle system on a prompt larger than the limit
        return max(num, num_resumed)

    def _is_attention_light(self, running: Sequence[_Seq], live: Sequence[tuple[int, int]],
                            candidates: Sequence[tuple[int, int]], predict_step_s: StepPredictor | None) -> bool:
        """Whether admitting every candidate keeps the step from being bound by attention: the step predicted at
        the peak total context of the running sequences and the candidates (``live`` and ``candidates``: their
        context and expected remaining steps), each grown to its expected end, is at most ``1 +
        sls_attention_margin`` times the step of the same sequences with no context (one token each, so the attend
        calls' fixed cost counts on both sides). Both count the sequences still running at the peak, the running
        ones on their nodes (``node_id``), the candidates not placed yet."""
        if predict_step_s is None or not candidates:
            return False
        _, peak_step = predicted_peak_and_step(itertools.chain(live, candidates))
        at_peak: dict[int | None, float] = defaultdict(float)
        empty: dict[int | None, float] = defaultdict(float)
        num_seqs = 0
        nodes = itertools.chain((getattr(s, "node_id", None) for s in running), itertools.repeat(None))
        for node_id, (context_len, num_remaining) in zip(nodes, itertools.chain(live, candidates)):
            if num_remaining > peak_step:  # still running at the peak
                at_peak[node_id] += context_len + peak_step
                empty[node_id] += 1.0
                num_seqs += 1
        margin = 1.0 + self.config.sls_attention_margin
        return predict_step_s(num_seqs, at_peak) <= margin * predict_step_s(num_seqs, empty)

    def _limit_with(self, limit: int, longest: int) -> float:
        """The context limit for a batch whose longest item reaches ``longest`` tokens (context_len + remaining
        steps - 1): a derived limit makes room for the longest beside B - 1 others of the steady share, so that one
        long request neither waits for the batch to empty nor holds it down to a few sequences while it runs. A
        limit the config gives is kept as it is."""
        if self.config.max_total_context is not None:
            return limit
        batch = self.config.max_num_seqs
        return max(limit, longest + limit * (batch - 1) / batch)

    def _credit_cap(self) -> float:
        return 2.0 * max(self.group_size, math.ceil(self.rate_per_step))
