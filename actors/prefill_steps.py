"""The prefill half of the Executor's step: run the admitted prompts' forward passes and place their K/V.

A step's prefills (``PrefillQueue.take_step``) run as forward passes (``forward_passes``): the whole prompts bound
for host nodes share passes, as do those bound for the Executor's device, up to ``pass_tokens`` a pass
(``prefill_together``), so a burst of short prompts costs a few passes, not one each; a prompt done in chunks runs
its chunk alone (``PrefillJob.run_chunk``). Each pass overlaps the placement of the one before it: its K/V copied to
the host, shipped to the nodes, the first tokens sampled. ``PrefillSteps`` is a part of ``Executor`` (its base
class), kept here so that the step loop reads on its own; it uses the Executor's nodes, runner, model, scheduler,
``max_model_len``, ``_preempt``, ``_finish_all`` and ``_sample_and_emit``.
"""
from __future__ import annotations

import asyncio
import collections
import logging

import torch

from fastdecode.actors.chunked_prefill import PrefillJob, forward_passes, prefill_together
from fastdecode.actors.guarded_node import REFUSED_CODES, NodeFailedError
from fastdecode.actors.sequence import SeqStatus
from fastdecode.transport.errors import RemoteRequestError

log = logging.getLogger("fastdecode.executor")

# a shared pass stages its prompts' K/V on the device beside the GPU KV pool until placed: at most a longest prompt's
# (the room the default pool leaves) or this many tokens' (within the fifth of free memory the pool leaves: 256 MiB
# of Llama-3-8B); a pass that runs out of memory all the same is run again a prompt at a time
SHARED_PASS_TOKENS = 2048


class PrefillSteps:
    async def _prefill_all(self, work: list[tuple[PrefillJob, int]]) -> None:
        """Run this step's prefills (``PrefillQueue.take_step``) as forward passes (``forward_passes``: the whole
        prompts bound for host nodes share passes, as do those for the Executor's device, up to ``pass_tokens``
        each), each pass overlapping the placement of the one before it (K/V copied to the host, shipped to
        their nodes, first tokens sampled); a prompt with chunks still to come waits for later steps. Prompts placed
        on a node of the Executor's device hold their staged K/V there until placed: that placement ends before the
        next pass stages more (the default GPU pool leaves room for one pass)."""
        placing: asyncio.Future | None = None
        placing_is_host = False
        passes = collections.deque(forward_passes(work, self.pass_tokens, self._is_host_job))
        try:
            while passes:
                batch = passes.popleft()
                is_host = self._is_host_job(batch[0][0])
                if placing is not None and not placing_is_host:
                    await placing
                    placing = None
                try:
                    computed = await self._prefill_pass(batch, self.runner.host_copies if is_host else None)
                except Exception as exc:
                    if len(batch) > 1:  # the prompts on their own may fit (or run where the shared pass failed)
                        log.warning("a prefill pass of %d prompts failed (%s: %s); prefilling them one by one",
                                    len(batch), type(exc).__name__, exc)
                        torch.cuda.empty_cache()
                        passes.extendleft([entry] for entry in reversed(batch))
                    elif isinstance(exc, torch.OutOfMemoryError):
                        await self._prefill_out_of_memory(batch[0][0], exc)
                    else:
                        raise
                    continue
                if computed is None:
                    continue
                if placing is not None:
                    await placing
                placing = asyncio.ensure_future(self._place_all(*computed))
                placing_is_host = is_host
            if placing is not None:
                await placing
        finally:
            if placing is not None and not placing.done():
                placing.cancel()

    @property
    def pass_tokens(self) -> int:
        """The most tokens one shared forward pass takes (``SHARED_PASS_TOKENS``)."""
        return max(self.max_model_len, SHARED_PASS_TOKENS)

    def _is_host_job(self, job: PrefillJob) -> bool:
        return self.nodes[job.node_index].is_host

    async def _prefill_pass(self, batch: list[tuple[PrefillJob, int]], host_copies):
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

    async def _prefill_out_of_memory(self, job: PrefillJob, exc: torch.OutOfMemoryError) -> None:
        """A prompt's prefill ran out of GPU memory (its K/V is staged beside the GPU KV pool): that request ends
        with a clear error and the rest go on (it used to fail the step, so every running request)."""
        log.warning("sequence %d: the prefill of its %d tokens ran out of GPU memory: %s", job.seq.seq_id,
                    len(job.token_ids), exc)
        torch.cuda.empty_cache()  # what the failed pass held, back for the others (a no-op without CUDA)
        message = (f"the prefill of this prompt ({len(job.token_ids)} tokens) ran out of GPU memory; a shorter "
                   "prompt fits (or a server started with a smaller --max-model-len, whose GPU KV pool leaves more)")
        await self._finish_all([(job.seq, job.seq.end_event("error", message), False)])

    async def _place_all(self, jobs: list[PrefillJob], logits: torch.Tensor,
                         kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Place a pass's prompts on their nodes, then sample the first token of each fresh one placed (a resumed
        sequence's next token comes from the next decode step)."""
        starting = [i for i, (job, (k, v)) in enumerate(zip(jobs, kvs))
                    if await self._place(job, k, v) and not job.is_resumed]
        if starting:
            rows = logits if len(starting) == len(jobs) else logits[starting]
            await self._sample_and_emit([jobs[i].seq for i in starting], rows,
                                        prompt_logprobs=[jobs[i].prompt_logprobs for i in starting])

    async def _place(self, job: PrefillJob, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Allocate the prompt's sequence on its node and store its K/V there; False where the node failed or
        refused it (requeued)."""
        seq, node_index = job.seq, job.node_index
        node = self.nodes[node_index]
        # placed from here on (as the scheduler sees it): a node failure requeues it at the next step
        seq.node_index, seq.node_epoch, seq.status = node_index, node.epoch, SeqStatus.RUNNING
        is_allocated = False
        try:
            await node.allocate([seq.seq_id])
            is_allocated = True
            await node.append_prompt(seq.seq_id, k, v)
        except NodeFailedError as exc:
            log.warning("prefill of sequence %d not placed: %s", seq.seq_id, exc)
            if not is_allocated and node.can_be_kept:  # a draining node refused it: nothing there, queue it again
                self.scheduler.preempt(seq.seq_id)
                seq.node_index, seq.status = None, SeqStatus.WAITING
            return False
        except RemoteRequestError as exc:
            if exc.code not in REFUSED_CODES:
                raise
            # the node had less room than the scheduler's model of it: requeue, as a refused attend does
            self.scheduler.preempt(seq.seq_id)
            await self._preempt(seq, node_index)
            return False
        if seq.is_recovering:
            seq.is_recovering = False
            self.num_recovered += 1
        return True
