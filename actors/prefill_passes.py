"""A step's prefills as forward passes on the dense thread, each overlapping the placement of the one before it.

A step's prefills (``PrefillQueue.take_step``) run as forward passes (``forward_passes``): the whole prompts bound
for host nodes share passes, as do those bound for the Executor's device, up to a pass's token limit
(``prefill_together``), so a burst of short prompts costs a few passes, not one each; a prompt done in chunks runs
its chunk alone (``PrefillJob.run_chunk``). While a pass bound for host nodes is placed (its K/V copied to the host,
shipped, the first tokens sampled: the Executor's ``place`` callback), the next pass runs. Prompts placed on a node
of the Executor's device hold their staged K/V there until placed: that placement ends before the next pass stages
more (the default GPU pool leaves room for one pass).
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

import torch

from fastdecode.actors.chunked_prefill import PrefillJob
from fastdecode.actors.dense_runner import DenseRunner
from fastdecode.actors.guarded_node import GuardedNode
from fastdecode.actors.model.attention import RaggedPrompts
from fastdecode.actors.prefill import prefill_hidden_ragged

log = logging.getLogger("fastdecode.executor")

# a shared pass stages its prompts' K/V on the device beside the GPU KV pool until placed: at most a longest prompt's
# (the room the default pool leaves) or this many tokens' (within the fifth of free memory the pool leaves: 256 MiB
# of Llama-3-8B); a pass that runs out of memory all the same is run again a prompt at a time
SHARED_PASS_TOKENS = 2048

Placement = Callable[[list[PrefillJob], torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]], Awaitable[None]]


def prefill_together(jobs: list[PrefillJob], model, host_copies=None):
    """On the dense thread: prefill the whole prompts of ``jobs`` (none begun) in one forward pass, their tokens
    laid end to end (``prefill_hidden_ragged``), so many short prompts cost about what one prompt of their total
    length does. (logits of each prompt's last position ``[len(jobs), vocab]``, each job's (keys, values)): views of
    the pass's K/V buffers, or through ``host_copies`` (as ``run_chunk``) a contiguous host copy of each."""
    if any(job.num_done for job in jobs):
        raise ValueError("prefill_together takes whole prompts; a prompt begun in chunks goes on in run_chunk")
    prompts = RaggedPrompts.of([len(job.token_ids) for job in jobs], model.device, model.dtype,
                               model.config.head_dim)
    seq_lens, ends = prompts.seq_lens, prompts.ends
    tokens = torch.tensor([t for job in jobs for t in job.token_ids], dtype=torch.long, device=model.device)
    hidden, keys, values = prefill_hidden_ragged(model, tokens, prompts)
    logits = model.logits(hidden[torch.tensor(ends, device=model.device) - 1])
    scored = [None if job.num_prompt_logprobs is None else job.score_prompt(model, hidden[end - n:end], 0, n)
              for job, n, end in zip(jobs, seq_lens, ends)]
    kvs = [(keys[:, end - n:end], values[:, end - n:end]) for n, end in zip(seq_lens, ends)]
    for job, (job_keys, job_values) in zip(jobs, kvs):
        job.keep_blocks(job_keys, job_values)
    if host_copies is not None:  # a contiguous host copy of each prompt's K/V, which its node ships as it is
        copies = host_copies(*(t for kv in kvs for t in kv))
        kvs = list(zip(copies[::2], copies[1::2]))
    for job, n, scores in zip(jobs, seq_lens, scored):  # once all went well: a failed pass leaves the jobs as they were
        job.num_done = n
        if scores is not None:
            job.prompt_logprobs = (None, *scores)
    return logits, kvs


def forward_passes(work: list[tuple[PrefillJob, int]], max_tokens: int,
                   kind) -> list[tuple[object, list[tuple[PrefillJob, int]]]]:
    """A step's prefills (``PrefillQueue.take_step``) as forward passes ``(kind, [(job, num_tokens), ...])``. Prompts
    prefilled whole in this step share passes with others of their ``kind(job)`` (where their K/V go: the host or
    the Executor's device), up to ``max_tokens`` tokens a pass, in order; a prompt done in chunks (begun, or not done
    in this step) is a pass of its own. A pass of one job runs ``run_chunk``, of more ``prefill_together``."""
    passes: list[tuple[object, list[tuple[PrefillJob, int]]]] = []
    open_passes: dict[object, tuple[list[tuple[PrefillJob, int]], int]] = {}  # kind -> (pass, its tokens)
    for job, num_tokens in work:
        key = kind(job)
        if job.num_done or num_tokens < job.num_left:
            passes.append((key, [(job, num_tokens)]))
            continue
        batch, total = open_passes.get(key, (None, 0))
        if batch is None or total + num_tokens > max_tokens:
            batch, total = [], 0
            passes.append((key, batch))
        batch.append((job, num_tokens))
        open_passes[key] = (batch, total + num_tokens)
    return passes


def _free_prefix_cache(job: PrefillJob) -> bool:
    """After a prefill ran out of device memory: empty the prefix cache, if it holds any blocks (True)."""
    cache = job.cache
    if cache is None or not cache.stats.num_bytes:
        return False
    log.warning("a prefill ran out of GPU memory: the prefix cache's %.2f GiB are freed and it runs again",
                cache.stats.num_bytes / (1 << 30))
    cache.clear()
    torch.cuda.empty_cache()
    return True


class PrefillPasses:
    """Runs a step's prefills for the Executor: ``place(jobs, logits, kvs)`` places a pass's prompts once computed
    (and samples their first tokens), ``out_of_memory(job, exc)`` ends a prompt that ran out of memory alone."""

    def __init__(self, model, runner: DenseRunner, nodes: list[GuardedNode], *, place: Placement,
                 out_of_memory: Callable[[PrefillJob, torch.OutOfMemoryError], Awaitable[None]]) -> None:
        self.model = model
        self.runner = runner
        self.nodes = nodes
        self._place = place
        self._out_of_memory = out_of_memory

    async def run(self, work: list[tuple[PrefillJob, int]], max_model_len: int) -> None:
        """Run ``work`` as passes of up to max(``max_model_len``, ``SHARED_PASS_TOKENS``) tokens. A shared pass
        that fails (out of GPU memory, or an error only a shared pass meets) is run again a prompt at a time."""
        placing: asyncio.Future | None = None
        placing_is_host = False
        passes = collections.deque(forward_passes(work, max(max_model_len, SHARED_PASS_TOKENS), self._is_host_job))
        try:
            while passes:
                is_host, batch = passes.popleft()
                if placing is not None and not placing_is_host:
                    await placing
                    placing = None
                try:
                    computed = await self._run_pass(batch, self.runner.host_copies if is_host else None)
                except Exception as exc:
                    if len(batch) > 1:  # the prompts on their own may fit (or run where the shared pass failed)
                        log.warning("a prefill pass of %d prompts failed (%s: %s); prefilling them one by one",
                                    len(batch), type(exc).__name__, exc,
                                    exc_info=not isinstance(exc, torch.OutOfMemoryError))
                        torch.cuda.empty_cache()
                        passes.extendleft((is_host, [entry]) for entry in reversed(batch))
                    elif isinstance(exc, torch.OutOfMemoryError) and _free_prefix_cache(batch[0][0]):
                        passes.appendleft((is_host, batch))  # once more, in the memory the cache held
                    elif isinstance(exc, torch.OutOfMemoryError):
                        await self._out_of_memory(batch[0][0], exc)
                    else:
                        raise
                    continue
                if computed is None:
                    continue
                if placing is not None:
                    await placing
                placing = asyncio.ensure_future(self._place(*computed))
                placing_is_host = is_host
            if placing is not None:
                await placing
        finally:
            if placing is not None and not placing.done():
                placing.cancel()

    def _is_host_job(self, job: PrefillJob) -> bool:
        return self.nodes[job.node_index].is_host

    async def _run_pass(self, batch: list[tuple[PrefillJob, int]], host_copies):
        """One forward pass on the dense thread: (its jobs, their last logits, their (keys, values)) once their
        prompts are whole, None while a chunked one has chunks to come."""
        if len(batch) > 1:
            jobs = [job for job, _ in batch]
            logits, kvs = await self.runner.run(prefill_together, jobs, self.model, host_copies)
            return jobs, logits, kvs
        job, num_tokens = batch[0]
        computed = await self.runner.run(job.run_chunk, self.model, num_tokens, host_copies)
        if computed is None:
            return None
        logits, keys, values = computed
        return [job], logits, [(keys, values)]
