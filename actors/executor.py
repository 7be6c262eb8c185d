"""The GPU Executor: owns the model and the step loop; KV lives on KV nodes.

``Executor.submit`` queues a request and returns its token stream. The loop runs
steps while there is work: reap cancelled requests (their KV is freed at once),
admit waiting ones (place on a node, prefill on the Executor's device, ship the
prompt's K/V to the node, sample the first token), make room by preemption if a
node would overflow, then one decode step over all running sequences split in
two mini-batches.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import torch

from fastdecode.actors.decode_step import DecodeStep, MiniBatch
from fastdecode.actors.dense_runner import DenseRunner
from fastdecode.actors.kv_nodes import KVNode
from fastdecode.actors.request import RequestError, SamplingParams, TokenEvent
from fastdecode.actors.prefill import prefill
from fastdecode.actors.sampling import SamplingRow, make_generator, sample
from fastdecode.actors.sequence import Sequence, SeqStatus, finish_reason_after
from fastdecode.actors.kv_budget import KVBudget
from fastdecode.actors.trace import StepTrace

log = logging.getLogger("fastdecode.executor")


@dataclass(frozen=True)
class ExecutorConfig:
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's context length
    max_queue: int = 4096
    is_pipelined: bool = True
    max_prefill_tokens: int = 8192  # prompt tokens prefilled per step at most (one prompt always fits)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be non-negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be at least 1")


class QueueFullError(RequestError):
    """More requests waiting than ``max_queue`` allows."""


class RequestStream:
    """The token events of one request; closing it early cancels the request."""

    def __init__(self, executor: "Executor", seq: Sequence) -> None:
        self._executor = executor
        self._seq = seq
        self._is_done = False

    @property
    def request_id(self) -> int:
        return self._seq.seq_id

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._is_done:
            raise StopAsyncIteration
        try:
            event = await self._seq.events.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if event.finish_reason is not None:
            self._is_done = True
        return event

    def cancel(self) -> None:
        """Stop the request; its KV is freed before the next step."""
        if not self._is_done:
            self._is_done = True
            self._executor.abort(self._seq.seq_id)

    async def aclose(self) -> None:
        self.cancel()


class Executor:
    def __init__(self, model, nodes: list[KVNode], config: ExecutorConfig, *, eos_token_ids,
                 trace: StepTrace | None = None) -> None:
        if not nodes:
            raise ValueError("the Executor needs at least one KV node")
        self.model = model
        self.nodes = nodes
        self.config = config
        self.max_model_len = min(config.max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.trace = trace
        self.runner = DenseRunner(model.device)
        self.decoder = DecodeStep(model, nodes, self.runner, trace)
        self.budget: KVBudget | None = None  # set by start(), from the nodes' capacities
        self._ids = itertools.count(1)
        self._admissions = itertools.count()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._by_id: dict[int, Sequence] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_steps = 0
        self.last_step_s = 0.0

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        stats = await asyncio.gather(*(n.stats() for n in self.nodes))
        cfg = self.model.config
        self.budget = KVBudget(
            total_pages=[s.num_total_pages for s in stats],
            page_sizes=[s.page_size for s in stats],
            num_layers=cfg.num_layers,
        )
        self._task = asyncio.create_task(self._loop(), name="fastdecode-executor")

    async def stop(self) -> None:
        """Stop the loop; unfinished requests end with an error event."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass  # the loop was cancelled on purpose
            self._task = None
        for seq in self._waiting + self._running:
            seq.emit(TokenEvent(seq.seq_id, -1, len(seq.output_ids), finish_reason="error",
                                error="the server is shutting down"))
        self._waiting.clear()
        self._running.clear()
        self.runner.close()

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} "
                "and at least one token must be generated")
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFullError(f"too many requests waiting ({len(self._waiting)})")
        seq_id = next(self._ids)
        seq = Sequence(seq_id, list(prompt_ids), params, asyncio.Queue(),
                       generator=make_generator(params.seed, self.model.device))
        self._waiting.append(seq)
        self._by_id[seq_id] = seq
        self._wakeup.set()
        return RequestStream(self, seq)

    def abort(self, seq_id: int) -> None:
        seq = self._by_id.get(seq_id)
        if seq is not None:
            seq.is_abort_requested = True
            self._wakeup.set()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ---- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._waiting and not self._running:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed step must not kill the server: fail its requests
                log.exception("step failed")
                await self._fail_running(f"internal error in the decode step: {exc}")

    async def step(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._reap()
        await self._admit()
        await self._make_room()
        if self._running:
            await self._decode()
        self.num_steps += 1
        self.last_step_s = loop.time() - start

    async def _finish(self, seq: Sequence, event: TokenEvent | None) -> None:
        """Leave the batch: free KV at once, tell the stream."""
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
            self.budget.release(seq.seq_id)
            await self.nodes[seq.node_index].free([seq.seq_id])
        elif seq in self._waiting:
            self._waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self._by_id.pop(seq.seq_id, None)
        if event is not None:
            seq.emit(event)

    async def _reap(self) -> None:
        for seq in [s for s in self._waiting + self._running if s.is_abort_requested]:
            await self._finish(seq, TokenEvent(seq.seq_id, -1, len(seq.output_ids), finish_reason="abort"))

    async def _fail_running(self, message: str) -> None:
        for seq in list(self._running):
            try:
                await self._finish(seq, None)
            except Exception:  # the node may be what failed; the request is ended either way
                log.exception("freeing sequence %d failed", seq.seq_id)
            seq.emit(TokenEvent(seq.seq_id, -1, len(seq.output_ids), finish_reason="error", error=message))

    # ---- admission and prefill --------------------------------------------------------------
    async def _admit(self) -> None:
        num_prefill_tokens = 0
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            seq = self._waiting[0]
            num_tokens = seq.num_tokens
            if num_prefill_tokens and num_prefill_tokens + num_tokens > self.config.max_prefill_tokens:
                break
            node_index = self._place(seq)
            if node_index is None:
                break  # no node has room now; try again after sequences finish
            self._waiting.pop(0)
            num_prefill_tokens += num_tokens
            await self._prefill(seq, node_index)

    def _place(self, seq: Sequence) -> int | None:
        """The node with the most free pages that can hold the sequence's prefill
        and its first decode step."""
        budget = self.budget
        fits = [n for n in range(len(self.nodes)) if budget.can_hold(n, seq.num_tokens + 1)]
        return max(fits, key=budget.free_pages, default=None)

    async def _prefill(self, seq: Sequence, node_index: int) -> None:
        node = self.nodes[node_index]
        # A preempted sequence is rebuilt from prompt + its output but the last token,
        # which the next decode step feeds in; its next token is not sampled here.
        is_rebuild = bool(seq.output_ids)
        ids = seq.all_ids[:-1] if is_rebuild else seq.prompt_ids
        tokens = torch.tensor(ids, dtype=torch.long, device=self.model.device)
        logits, k, v = await self.runner.run(prefill, self.model, tokens)
        if node.is_host:
            k, v = await self.runner.to_host(k, v)
        await node.allocate([seq.seq_id])
        self.budget.hold(node_index, seq.seq_id, len(ids))
        await node.append_prompt(seq.seq_id, k, v)
        seq.node_index = node_index
        seq.admitted_order = next(self._admissions)
        seq.status = SeqStatus.RUNNING
        seq.num_cached = len(ids)
        self._running.append(seq)
        if not is_rebuild:
            await self._sample_and_emit([seq], logits)

    async def _make_room(self) -> None:
        """Preempt the youngest sequence of any node that would overflow this step."""
        while True:
            node_index = self.budget.overflowing_node({s.seq_id: s.num_tokens for s in self._running})
            if node_index is None:
                return
            victims = [s for s in self._running if s.node_index == node_index]
            victim = max(victims, key=lambda s: s.admitted_order)
            log.info("node %d is full: preempting sequence %d", node_index, victim.seq_id)
            self._running.remove(victim)
            self.budget.release(victim.seq_id)
            await self.nodes[node_index].free([victim.seq_id])
            victim.status = SeqStatus.WAITING
            victim.node_index = None
            victim.num_preemptions += 1
            self._waiting.insert(0, victim)

    # ---- decode -------------------------------------------------------------------------------
    def _split(self) -> list[MiniBatch]:
        seqs = self._running
        if not self.config.is_pipelined or len(seqs) < 2:
            return [MiniBatch.build(0, seqs)]
        half = (len(seqs) + 1) // 2
        return [MiniBatch.build(0, seqs[:half]), MiniBatch.build(1, seqs[half:])]

    async def _decode(self) -> None:
        minibatches = self._split()
        for mb in minibatches:
            for seq in mb.seqs:
                self.budget.hold(seq.node_index, seq.seq_id, seq.num_tokens)
        trace_start = self.trace.now() if self.trace is not None else 0.0
        logits = await self.decoder.run(minibatches, is_pipelined=self.config.is_pipelined)
        if self.trace is not None:
            self.trace.add_step(self.decoder.step_index, trace_start, self.trace.now(), len(self._running))
        for mb, mb_logits in zip(minibatches, logits):
            for seq in mb.seqs:
                seq.num_cached = seq.num_tokens
            await self._sample_and_emit(mb.seqs, mb_logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor):
        """Token ids, logprobs and top logprobs as Python values (runs on the dense thread)."""
        rows = [SamplingRow(s.params, s.prompt_ids, s.output_ids, s.generator) for s in seqs]
        out = sample(logits, rows, eos_token_ids=tuple(self.eos_token_ids))
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else [None] * len(seqs)
        tops: list[tuple] = [()] * len(seqs)
        if out.top_token_ids is not None:
            ids, lps = out.top_token_ids.tolist(), out.top_logprobs.tolist()
            tops = [tuple(zip(ids[i], lps[i]))[: s.params.logprobs or 0] for i, s in enumerate(seqs)]
        return token_ids, logprobs, tops

    async def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        token_ids, logprobs, tops = await self.runner.run(self._sample, seqs, logits)
        for seq, token_id, logprob, top in zip(seqs, token_ids, logprobs, tops):
            seq.output_ids.append(token_id)
            reason = finish_reason_after(seq, token_id, eos_token_ids=self.eos_token_ids,
                                         max_model_len=self.max_model_len)
            event = TokenEvent(seq.seq_id, token_id, len(seq.output_ids) - 1, logprob, top, reason)
            if reason is None:
                seq.emit(event)
            else:
                await self._finish(seq, event)
