"""Chunked prefill: the admitted prompts' prefills, within a per-step token budget.

As vLLM's: a step carries at most ``max_num_batched_tokens`` tokens; each sequence
decoding in it counts one, the admitted prompts share the rest, first come first
served. A prompt that fits what is left is prefilled whole in this step (the
Executor's ``PrefillPasses``, which overlaps placements); the first one that does not
gets the rest of the budget and is prefilled a chunk per step, its K/V so far kept
on the Executor's device in its ``PrefillJob`` (buffers for the whole prompt, which the
chunks attend over in place). Its sequence is not RUNNING until its
last chunk is placed, so the decode steps run on without it: a long prompt no longer
stalls the running streams for its whole prefill. A job dies with its sequence's
admission: abort, preemption, requeue off a failed node, stop (``PrefillQueue.drop``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdecode.actors.prefill import kv_buffers, prefill_hidden, prompt_token_logprobs
from fastdecode.actors.prefix_cache import CachedBlock, PrefixCache, fill_prefix
from fastdecode.actors.request import PromptLogprob
from fastdecode.actors.sequence import Sequence

MIN_PREFILL_TOKENS = 64  # the budget's floor (or the whole limit, if smaller): a prefill always progresses


@dataclass(eq=False)
class PrefillJob:
    """One admitted sequence's prefill: the tokens to prefill and, once chunked, the K/V buffers of the whole prompt
    (``[num_layers, len, Hkv, D]``), filled up to ``num_done``: each chunk writes its K/V there and attends in place. A preempted or recovering sequence is rebuilt from prompt + its output but
    the last token (``is_resumed``), which the next decode step feeds in: its next token is not sampled then.
    A fresh prompt whose request asks for ``prompt_logprobs`` (``num_prompt_logprobs``) gathers them chunk by chunk
    in ``prompt_logprobs``; a resumed one does not: its stream had them with its first token.
    With a ``PrefixCache`` (``cache``), the job starts after the cached blocks that begin its tokens (``cached``,
    copied into its whole-prompt buffers by its first chunk, then let go), and its whole blocks are cached once it
    is done."""

    seq: Sequence
    node_index: int
    token_ids: list[int]
    is_resumed: bool
    num_done: int = 0
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    num_prompt_logprobs: int | None = None
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    cache: PrefixCache | None = None
    cached: list[CachedBlock] | None = None

    @classmethod
    def for_sequence(cls, seq: Sequence, node_index: int, cache: PrefixCache | None = None) -> "PrefillJob":
        is_resumed = bool(seq.output_ids)
        if is_resumed:
            job = cls(seq, node_index, seq.all_ids[:-1], is_resumed, cache=cache)
        else:
            job = cls(seq, node_index, list(seq.prompt_ids), is_resumed,
                      num_prompt_logprobs=seq.params.prompt_logprobs, cache=cache)
        if cache is not None and job.num_prompt_logprobs is None:  # prompt logprobs score every prompt position
            job.cached = cache.lookup(job.token_ids) or None
            job.num_done = sum(block.keys.shape[1] for block in job.cached or ())
        return job

    @property
    def num_left(self) -> int:
        return len(self.token_ids) - self.num_done

    def run_chunk(self, model, num_tokens: int, host_copies=None):
        """On the dense thread: prefill the next ``num_tokens`` positions. Once the last is done: (last logits,
        keys, values) of the whole prompt (through ``host_copies`` for a host node, in the same dense-thread job
        so the copy does not queue behind the next prompt's forward pass), else None."""
        start = self.num_done
        end = start + min(num_tokens, self.num_left)
        tokens = torch.tensor(self.token_ids[start:end], dtype=torch.long, device=model.device)
        if self.keys is None and (start or end < len(self.token_ids)):  # buffers for the whole prompt
            keys, values = kv_buffers(model, len(self.token_ids))
            if fill_prefix(self.cached or [], keys, values) != start:
                raise RuntimeError(f"a prefill at position {start} found no K/V before it")
            # set once filled (a pass that ran out of memory here is run again); the blocks are copied: let them go
            self.keys, self.values, self.cached = keys, values, None
        hidden, keys, values = prefill_hidden(model, tokens, start, self.keys, self.values)
        logits = model.logits(hidden[-1:])
        if self.num_prompt_logprobs is not None:
            self.prompt_logprobs = (*(self.prompt_logprobs or (None,)), *self.score_prompt(model, hidden, start, end))
        self.num_done = end
        if self.num_left:
            return None
        self.keys = self.values = None  # handed over with the last chunk
        self.keep_blocks(keys, values)
        if host_copies is not None:
            keys, values = host_copies(keys, values)
        return logits, keys, values

    def keep_blocks(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """On the dense thread, once the prompt's K/V are whole (on the Executor's device): its whole blocks into
        the prefix cache."""
        if self.cache is not None:
            self.cache.insert(self.token_ids, keys, values)

    def score_prompt(self, model, hidden: torch.Tensor, start: int, end: int) -> list[PromptLogprob]:
        """The prompt logprobs that positions ``start``..``end`` (``hidden``) give: each position's logits score the
        prompt token after it (the last one's, the first output token; the first token follows nothing)."""
        next_ids = torch.tensor(self.token_ids[start + 1:end + 1], dtype=torch.long, device=model.device)
        return prompt_token_logprobs(model, hidden, next_ids, self.num_prompt_logprobs)


class PrefillQueue:
    """The admitted sequences whose prefill is pending or under way, in admission order."""

    def __init__(self, max_num_batched_tokens: int | None, cache: PrefixCache | None = None) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens or None  # None: no limit, every prompt whole
        self.cache = cache
        self._jobs: dict[int, PrefillJob] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._jobs

    def job(self, seq_id: int) -> PrefillJob | None:
        return self._jobs.get(seq_id)

    def add(self, seq: Sequence, node_index: int) -> None:
        if seq.seq_id in self._jobs:
            raise ValueError(f"sequence {seq.seq_id} is already being prefilled")
        self._jobs[seq.seq_id] = PrefillJob.for_sequence(seq, node_index, self.cache)

    def drop(self, seq_id: int) -> bool:
        """Forget a sequence's prefill and the K/V computed so far (False if it had none)."""
        return self._jobs.pop(seq_id, None) is not None

    def clear(self) -> None:
        self._jobs.clear()

    def budget(self, num_decoding: int) -> int | None:
        """Prefill tokens a step with ``num_decoding`` decoding sequences may carry (None: no limit)."""
        if self.max_num_batched_tokens is None:
            return None
        floor = min(MIN_PREFILL_TOKENS, self.max_num_batched_tokens)
        return max(self.max_num_batched_tokens - num_decoding, floor)

    def take_step(self, num_decoding: int) -> list[tuple[PrefillJob, int]]:
        """This step's prefills ``(job, num_tokens)``, first come first served within the budget: a job chunked
        before goes on first (it is the oldest), the next ones that fit are prefilled whole, and the first that
        does not gets what is left. A job leaves the queue with the step that does its last token."""
        budget = self.budget(num_decoding)
        work: list[tuple[PrefillJob, int]] = []
        for job in list(self._jobs.values()):
            num_tokens = job.num_left if budget is None else min(budget, job.num_left)
            if num_tokens == 0:
                break
            work.append((job, num_tokens))
            if num_tokens < job.num_left:
                break  # the budget is spent: the rest of it in later steps
            del self._jobs[job.seq.seq_id]
            budget = None if budget is None else budget - num_tokens
        return work
