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
  state's total plus ``sls_load_headroom``.

The expected output length is re-planned as sequences finish: it is the mean
``max_tokens`` of arrivals times the observed fraction of ``max_tokens`` that
finished sequences used.  An early finish (EOS before ``max_tokens``) updates
that fraction, which raises the rate, and credits its freed slot at once.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol

from fastdecode.scheduler.config import SchedulerConfig


class _Seq(Protocol):
    """What admission reads of a sequence (``SequenceRecord`` is one)."""

    @property
    def context_len(self) -> int: ...

    num_generated: int
    max_tokens: int


def predicted_peak_context(items: Iterable[tuple[int, int]]) -> int:
    """Peak over future steps of the total context of (context_len, num_remaining_steps) items.

    Each item grows by one token per step and leaves after its remaining steps;
    the total is highest just before some item leaves, so only those instants
    are checked.
    """
    ordered = sorted(items, key=lambda item: -item[1])
    peak = 0
    context_sum = 0
    count = 0
    for index, (context_len, num_remaining) in enumerate(ordered):
        context_sum += context_len
        count += 1
        is_last_of_tie = index + 1 == len(ordered) or ordered[index + 1][1] != num_remaining
        if is_last_of_tie:
            peak = max(peak, context_sum + max(num_remaining - 1, 0) * count)
    return peak


class AdmissionPolicy:
    """Decides how many of the waiting sequences (taken in order) to admit each step."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._mean_prompt_len: float | None = None
        self._mean_max_tokens: float | None = None
        self._completion_fraction = 1.0
        self._credit = 0.0
        self._has_started = False

    # --- estimates -----------------------------------------------------------------
    @property
    def expected_output_len(self) -> float:
        """Expected tokens a sequence generates: mean max_tokens times the observed fraction used."""
        if self._mean_max_tokens is None:
            return 1.0
        return max(1.0, self._mean_max_tokens * self._completion_fraction)

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
        if self._mean_prompt_len is None:
            return None
        steady = self.config.max_num_seqs * (self._mean_prompt_len + self.expected_output_len / 2.0)
        return math.ceil(steady * (1.0 + self.config.sls_load_headroom))

    def expected_remaining(self, seq: _Seq) -> int:
        """Steps a sequence is expected to run still (at least 1, at most to max_tokens)."""
        expected_total = min(seq.max_tokens, math.ceil(seq.max_tokens * self._completion_fraction))
        return max(1, expected_total - seq.num_generated)

    # --- events --------------------------------------------------------------------
    def on_arrival(self, prompt_len: int, max_tokens: int) -> None:
        rate = self.config.estimate_rate
        if self._mean_prompt_len is None or self._mean_max_tokens is None:
            self._mean_prompt_len, self._mean_max_tokens = float(prompt_len), float(max_tokens)
        else:
            self._mean_prompt_len += rate * (prompt_len - self._mean_prompt_len)
            self._mean_max_tokens += rate * (max_tokens - self._mean_max_tokens)

    def on_finish(self, num_generated: int, max_tokens: int) -> None:
        """A sequence finished after ``num_generated`` of its ``max_tokens``: re-plan."""
        fraction = min(1.0, max(num_generated, 1) / max_tokens)
        self._completion_fraction += self.config.estimate_rate * (fraction - self._completion_fraction)
        if num_generated < max_tokens:
            self._credit = min(self._credit + 1.0, self._credit_cap())

    def on_admitted(self, num_admitted: int) -> None:
        self._credit = max(0.0, self._credit - num_admitted)

    # --- decision ------------------------------------------------------------------
    def num_to_admit(self, running: Sequence[_Seq], waiting: Sequence[_Seq]) -> int:
        """How many sequences from the head of ``waiting`` to admit this step (call once per step)."""
        num_slots = max(0, self.config.max_num_seqs - len(running))
        num_candidates = min(num_slots, len(waiting))
        if self.config.admission == "all-at-once" or num_candidates == 0:
            return num_candidates
        group = self.group_size
        if not self._has_started or not running:
            self._credit = max(self._credit, float(group))  # cold start: the first group goes at once
            self._has_started = True
        else:
            self._credit = min(self._credit + self.rate_per_step, self._credit_cap())
        num = min(num_candidates, group * math.floor(self._credit / group))
        limit = self.context_limit
        if num == 0 or limit is None:
            return num
        live = [(s.context_len, self.expected_remaining(s)) for s in running]
        while num > 0:
            group_items = [(s.context_len, self.expected_remaining(s)) for s in waiting[:num]]
            if predicted_peak_context(live + group_items) <= limit:
                break
            num -= 1
        if num == 0 and not running:
            num = 1  # never stall an idle system on a prompt larger than the limit
        return num

    def _credit_cap(self) -> float:
        return 2.0 * max(self.group_size, math.ceil(self.rate_per_step))
