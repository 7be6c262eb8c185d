"""The scheduler's configuration: one frozen, validated dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass

ADMISSION_MODES = ("sls", "all-at-once")


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler admits, places and splits sequences.

    - ``max_num_seqs``: most sequences running at once (the batch size B).
    - ``admission``: ``"sls"`` (sequence-level load stabilisation: small groups at
      a steady rate, total context held under a limit) or ``"all-at-once"``
      (every free slot is filled as soon as memory allows).
    - ``overcommit``: how far the sum of residents' reserved pages may exceed
      a node's memory (1.0: never runs out while every sequence stays within its reservation).
    - ``max_reserved_output``: the most output tokens ahead of its current length that a running
      sequence reserves KV for (its reservation is ``min(max_tokens, generated + this)`` output tokens,
      and this is at most an eighth of its node's tokens: ``placement.reserved_output_limit``);
      None reserves the whole ``max_tokens``. A chat request that gives no max_tokens may otherwise
      reserve the whole context and hold a node alone; as SGLang clips its estimate of such requests,
      a sequence that outgrows its reservation on a full node is met by preempting the youngest there.
    - ``sls_min_group_size``: fewest sequences SLS admits together (prefill in
      groups is cheaper per token than one by one).
    - ``sls_load_headroom``: the SLS context limit is the steady-state total
      context ``B * (mean prompt + mean output / 2)`` times ``1 + headroom``.
    - ``sls_free_load``: while the running and waiting sequences together are at most this share of
      ``max_num_seqs``, SLS admits every waiting sequence at once (still under the context limit): a
      lightly loaded server starts requests as they come, and pacing starts only as the batch fills.
    - ``sls_attention_margin``: SLS paces only where attention bounds the step: when the predicted decode step at
      the predicted peak total context (live sequences grown to their expected ends, plus the candidates) is more
      than this fraction slower than the same step with no context. Otherwise (attention hidden under the dense
      part, or small against it) the candidates start at once: pacing would hold requests for no level to keep.
    - ``max_total_context``: an explicit SLS context limit in tokens (overrides the derived one).
    - ``estimate_rate``: EWMA rate of the running estimates (prompt and output lengths).
    - ``is_single_minibatch_allowed``: the split may put every sequence in one mini-batch
      when the model predicts that faster; False keeps two (the Executor's pipeline switch).
    - ``rebalance_threshold``: re-split the mini-batches when a fresh split predicts a
      step at least this fraction faster than the current one.
    """

    max_num_seqs: int = 256
    admission: str = "sls"
    overcommit: float = 1.0
    max_reserved_output: int | None = 4096
    sls_min_group_size: int = 1
    sls_load_headroom: float = 0.1
    sls_free_load: float = 0.5
    sls_attention_margin: float = 0.1
    max_total_context: int | None = None
    estimate_rate: float = 0.05
    rebalance_threshold: float = 0.02
    is_single_minibatch_allowed: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        def number_in(name: str, low: float, high: float, *, low_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value > high or value < low or (low_open and value == low):
                bracket = "(" if low_open else "["
                raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")

        positive_int("max_num_seqs")
        positive_int("sls_min_group_size")
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, got {self.admission!r}")
        number_in("overcommit", 1.0, 100.0)
        number_in("sls_load_headroom", 0.0, 10.0)
        number_in("sls_free_load", 0.0, 1.0)
        number_in("sls_attention_margin", 0.0, 10.0)
        number_in("estimate_rate", 0.0, 1.0, low_open=True)
        number_in("rebalance_threshold", 0.0, 1.0)
        if self.max_total_context is not None:
            positive_int("max_total_context")
        if self.max_reserved_output is not None:
            positive_int("max_reserved_output")
