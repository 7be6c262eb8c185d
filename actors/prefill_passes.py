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

from fastdecode.actors.chunked_prefill import PrefillJob, forward_passes, prefill_together
from fastdecode.actors.dense_runner import DenseRunner
from fastdecode.actors.guarded_node import GuardedNode

log = logging.getLogger("fastdecode.executor")

# a shared pass stages its prompts' K/V on the device beside the GPU KV pool until placed: at most a longest prompt's
# (the room the default pool leaves) or this many tokens' (within the fifth of free memory the pool leaves: 256 MiB
# of Llama-3-8B); a pass that runs out of memory all the same is run again a prompt at a time
SHARED_PASS_TOKENS = 2048

Placement = Callable[[list[PrefillJob], torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]], Awaitable[None]]


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
