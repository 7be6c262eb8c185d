"""The GPU Executor: owns the model and the step loop; KV lives on KV nodes.

``Executor.submit`` queues a request and returns its token stream. The loop runs steps while there is work. Each
step: reap cancelled requests (KV freed at once), ask the scheduler for a plan (``fastdecode.scheduler``:
preemptions, admissions with placement, the two mini-batches), carry it out (free preempted KV, prefill admitted
sequences on the Executor's device, prompts admitted together in shared forward passes, and ship their K/V to their
node: ``prefill_passes``), then run one decode step over the mini-batches and sample. Prefills share a step's token
budget with its decodes: a long prompt is prefilled in chunks over several steps (``chunked_prefill``) while the
running sequences go on decoding.

KV nodes fail and come back (``NodeBook``): at each step boundary a failed or draining node leaves the scheduler and
the sequences it held are requeued; they are rebuilt on surviving nodes by prefilling prompt plus the tokens already
generated, so their streams go on with no token duplicated or missing. Rows of a node that failed during a decode
step are dropped from its sampling and decoded again once rebuilt. A node that returns is a new epoch and is used
again. A draining node that no other node can relieve keeps serving its sequences (``node_drain``). With no node
left, running requests end with an error and new ones are refused (``UnavailableError``) until one returns.
``drain()`` stops admitting and lets the accepted requests finish.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time

import torch

from fastdecode.actors.chunked_prefill import PrefillJob, PrefillQueue
from fastdecode.actors.decode_step import DecodeStep, MiniBatch
from fastdecode.actors.dense_profile import measure_dense_profile
from fastdecode.actors.dense_runner import DenseRunner
from fastdecode.actors.engine_health import loop_death
from fastdecode.actors.executor_config import ExecutorConfig, QueueFullError, UnavailableError, check_prompt
from fastdecode.actors.guarded_node import REFUSED_CODES, GuardedNode, NodeFailedError
from fastdecode.actors.kv_nodes import KVNode, node_model
from fastdecode.actors.node_book import NodeBook
from fastdecode.actors.node_drain import no_live_node_error
from fastdecode.actors.prefill_passes import PrefillPasses
from fastdecode.actors.recovery import Backoff, NodeFactory
from fastdecode.actors.request import RequestError, SamplingParams, TokenEvent
from fastdecode.actors.request_stream import RequestStream
from fastdecode.actors.sampling import make_generator
from fastdecode.actors.sequence import EventChannel, HeldEvents, Sequence, SeqStatus, finish_reason_after
from fastdecode.actors.structured_output import GrammarBackend, matcher_for
from fastdecode.actors.trace import StepTrace
from fastdecode.actors.warm_up import needs_warm_up, warm_up
from fastdecode.scheduler import AttendCall, GpuPerfModel, Scheduler
from fastdecode.scheduler.scheduler import NoNodeFitsError
from fastdecode.transport.errors import RemoteRequestError

log = logging.getLogger("fastdecode.executor")

NODE_POLL_S = 0.5  # an idle Executor looks at its nodes' heartbeats this often
DRAIN_POLL_S = 0.05
STOP_FREE_TIMEOUT_S = 2.0  # the most stop() waits to free the KV of unfinished requests
STRANDED = "the KV node that held this sequence left, and no node left can hold its length; retry later"


class Executor:
    def __init__(self, model, nodes: list[KVNode], config: ExecutorConfig, *, eos_token_ids,
                 trace: StepTrace | None = None, gpu_model: GpuPerfModel | None = None,
                 node_factories: list[NodeFactory | None] | None = None,
                 reconnect_backoff: Backoff = Backoff(), seed: int = 0,
                 grammars: GrammarBackend | None = None) -> None:
        """``node_factories[i]``, when given, makes a fresh node ``i`` after it failed (None: it never returns).
        ``seed`` seeds the engine's generator (vLLM's); ``grammars`` compiles structured outputs (None: refused)."""
        if not nodes:
            raise ValueError("the Executor needs at least one KV node")
        if node_factories is not None and len(node_factories) != len(nodes):
            raise ValueError("give one node factory (or None) per node")
        self.model = model
        self._wakeup = asyncio.Event()
        self.kv_bytes_per_token = model.config.kv_bytes_per_token(model.dtype.itemsize)
        self.node_book = NodeBook(nodes, node_factories or [None] * len(nodes), backoff=reconnect_backoff,
                                  on_ready=self._wakeup.set, num_layers=model.config.num_layers,
                                  kv_bytes_per_token=self.kv_bytes_per_token)
        self.nodes = self.node_book.nodes
        self.config = config
        self.max_model_len = config.max_len_for(model.config.max_position_embeddings)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._eos_tuple = tuple(self.eos_token_ids)
        self.trace = trace
        self.gpu_model = gpu_model
        self.grammars = grammars
        self.runner = DenseRunner(model.device, is_synchronous=trace is not None)
        self._generator = make_generator(seed, model.device)
        self.decoder = DecodeStep(model, self.nodes, self.runner, trace)  # the same list: restored nodes show
        self.scheduler: Scheduler | None = None  # made by start(), from the nodes' capacities
        self.predicted_steps_s: list[float] = []  # with a trace: the step model's prediction of each traced step
        self._ids = itertools.count(1)
        self._sequences: dict[int, Sequence] = {}  # every live request, waiting or running
        self._abort_requested: dict[int, bool] = {}  # of _sequences, reaped at the next step -> is_stop
        self.prefills = PrefillQueue(config.batched_tokens_for(model.device), config.prefix_cache(model.device))
        self.prefill_passes = PrefillPasses(model, self.runner, self.nodes, place=self._place_all,
                                            out_of_memory=self._prefill_out_of_memory)
        self._held = HeldEvents()  # a step's token events, handed out as the next decode step starts
        self._task: asyncio.Task | None = None
        self.num_steps = 0
        self.last_step_s = 0.0
        self.num_recovered = 0  # sequences rebuilt on another node after theirs failed or drained
        self.num_preempted = 0  # sequences whose KV was dropped for room (planned, or refused by a node)
        self.is_draining = False
        self.is_stopped = False  # stop() began: no request is taken any more
        self.loop_death: str | None = None  # how the step loop ended without stop() (engine_health.loop_death)
        self.loop_death_cause: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        stats = await asyncio.gather(*(n.stats() for n in self.nodes))
        num_layers = self.model.config.num_layers
        graphs, whole_step = self.decoder.graphs, None
        if self.config.is_warmed_up and needs_warm_up(self.model, self.decoder):
            await self.runner.run(warm_up, self.model, self.decoder)
        if graphs is not None and self.config.profile_batches:  # time the steps as they will run
            samples = await self.runner.run(graphs.profile, self.config.profile_batches)
            if len(samples) >= 2:
                whole_step = GpuPerfModel(samples)
                log.info("whole-step times: %s", ", ".join(f"B={b}: {s * 1e3:.2f} ms" for b, s in samples))
        models = [node_model(i, s, num_layers=num_layers, kv_bytes_per_token=self.kv_bytes_per_token,
                             whole_step=whole_step if graphs is not None and node.inner is graphs.node else None)
                  for i, (node, s) in enumerate(zip(self.nodes, stats))]
        self.max_model_len = self.config.max_len_for(self.model.config.max_position_embeddings,
                                                     max(m.num_pages * m.page_size for m in models))
        if self.gpu_model is None and self.config.profile_batches:
            self.gpu_model = await self.runner.run(measure_dense_profile, self.model, self.config.profile_batches)
            log.info("dense step times: %s", ", ".join(f"B={b}: {s * 1e3:.2f} ms" for b, s in self.gpu_model.samples))
        # with the pipeline on, the scheduler keeps two mini-batches even where it would pick one
        scheduler_config = dataclasses.replace(self.config.scheduler,
                                               is_single_minibatch_allowed=not self.config.is_pipelined)
        self.scheduler = Scheduler(scheduler_config, models, gpu=self.gpu_model,
                                   is_pipelined=self.config.is_pipelined)
        self._task = asyncio.create_task(self._loop(), name="fastdecode-executor")
        self._task.add_done_callback(self._on_loop_end)

    @property
    def is_looping(self) -> bool:  # the step loop runs: started, and neither stopped nor dead
        return self._task is not None and not self._task.done()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait until the accepted ones finished (True) or ``timeout_s`` passed."""
        self.is_draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._sequences and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self._sequences:
            log.warning("drain deadline: %d request(s) still unfinished", len(self._sequences))
        return not self._sequences

    async def stop(self) -> None:
        """Stop the loop and the reconnects; unfinished requests end with an error, later ones are refused."""
        self.is_stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # cancelled here, or dead already
            self._task = None
        await self.node_book.close()
        if self.loop_death is None:  # else each one has ended already (_on_loop_end)
            self._end_all("the server is shutting down")
        placed = [self._unplace(seq) for seq in self._sequences.values()]
        self._sequences.clear()
        self.prefills.clear()
        # a step may still run on the dense thread: wait for it off the loop, which may be what serves the
        # in-process shards that step is waiting for
        await self.runner.close_off_loop()
        # then free what the unfinished requests held, so that a server started next is not refused by busy shards
        await self.node_book.release_within(placed, STOP_FREE_TIMEOUT_S)

    def _on_loop_end(self, task: asyncio.Task) -> None:
        """The step loop ended: without a stop, its requests end now (stop() frees their KV), later ones refused."""
        if self.is_stopped:
            return
        self.loop_death, self.loop_death_cause = loop_death(task)
        log.error("the engine's step loop ended without stop(): %s", self.loop_death, exc_info=self.loop_death_cause)
        self._end_all(f"the engine's step loop ended ({self.loop_death}); the server must be restarted")

    def _end_all(self, message: str) -> None:
        """Every unfinished request ends with a retryable error ``message``, after the tokens held for them."""
        self._held.emit()
        for seq in self._sequences.values():
            seq.emit(seq.end_event("error", message, is_retryable=True))

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        if self.is_draining or self.is_stopped or self.loop_death is not None:
            raise UnavailableError("the engine's step loop ended; the server must be restarted" if self.loop_death
                                   else "the server is shutting down and takes no new requests")
        if not self.has_live_node:
            raise no_live_node_error(self.nodes)
        params = check_prompt(prompt_ids, self.model.config.vocab_size, self.max_model_len, params,
                              self._eos_tuple, self.config.max_logprobs)
        if self.num_waiting >= self.config.max_queue:
            raise QueueFullError(f"too many requests waiting ({self.num_waiting})")
        matcher = matcher_for(self.grammars, params)
        seq_id = next(self._ids)
        params = params.within(self.max_model_len - len(prompt_ids))
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        try:
            self.scheduler.add_request(seq_id, len(prompt_ids), max_tokens)
        except NoNodeFitsError as exc:  # within max_model_len: the nodes that could hold it are away
            raise UnavailableError(f"{exc} now; retry later") from None
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        seq = Sequence(seq_id, list(prompt_ids), params, EventChannel(),
                       generator=make_generator(params.seed, self.model.device), matcher=matcher)
        self._sequences[seq_id] = seq
        self._wakeup.set()
        return RequestStream(self, seq)

    def abort(self, seq_id: int, *, is_stop: bool = False) -> None:
        """End a request at the next step: its client gone, or (``is_stop``) it reached a stop string."""
        seq = self._sequences.get(seq_id)
        if seq is not None:
            seq.is_abort_requested = True
            self._abort_requested[seq_id] = is_stop
            self._wakeup.set()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting if self.scheduler else 0

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running if self.scheduler else 0

    @property
    def live_nodes(self) -> list[GuardedNode]:
        return [node for node in self.nodes if node.is_alive]

    @property
    def has_live_node(self) -> bool:
        return bool(self.live_nodes)

    # ---- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._wakeup.clear()  # what sets it from here on (a request, an abort, a node back) ends the wait below
            is_waiting = True
            if not self._sequences:
                try:
                    await self._apply_node_changes()
                except Exception:  # a node that fails while being restored is retried later
                    log.exception("node bookkeeping failed")
            else:
                try:
                    is_waiting = not await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a failed step must not kill the server: fail its requests
                    log.exception("step failed")
                    await self._fail(list(self._sequences.values()), f"internal error in the decode step: {exc}")
                    is_waiting = False
            if is_waiting:  # idle, or every sequence waits for a node to take it: nothing in a step would suspend
                try:
                    await asyncio.wait_for(self._wakeup.wait(), NODE_POLL_S)
                except TimeoutError:
                    pass  # time to look at the nodes' heartbeats again

    async def step(self) -> bool:
        """One step: abort what was asked, follow the nodes, admit, prefill and decode. False when it had nothing to
        run: its sequences wait for room or for a node that could take them (the only one drains)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._reap()
        await self._apply_node_changes()
        if not self._sequences:
            return True
        plan = self.scheduler.schedule()
        for preemption in plan.preempted:
            await self._preempt(self._sequences[preemption.seq_id], preemption.node_id)
        for admission in plan.admitted:  # never to a kept draining node: _apply_node_changes closed it
            self.prefills.add(self._sequences[admission.seq_id], admission.node_id)
        had_prefills = bool(self.prefills)
        if had_prefills:
            self._held.emit()  # prefills take a while: the streams should not wait for them
            num_decoding = sum(1 for ids in plan.minibatches for s in map(self._sequences.get, ids)
                               if s is not None and self._is_placed(s))
            await self.prefill_passes.run(self.prefills.take_step(num_decoding), self.max_model_len)
        minibatches = [[s for s in (self._sequences.get(i) for i in ids) if s is not None and self._is_placed(s)]
                       for ids in plan.minibatches]
        minibatches = [mb for mb in minibatches if mb]
        if minibatches:
            await self._decode(minibatches)
        else:
            self._held.emit()
            if not (plan.admitted or plan.preempted or had_prefills):
                return False  # not a step: the metrics' step count and time stay those of the last one run
        self.num_steps += 1
        self.last_step_s = loop.time() - start
        return True

    def _is_placed(self, seq: Sequence) -> bool:
        """The sequence's KV is on a node that attends (live, or draining and kept), in the epoch it was placed in."""
        if seq.status is not SeqStatus.RUNNING or seq.node_index is None:
            return False
        node = self.nodes[seq.node_index]
        return node.can_attend and node.epoch == seq.node_epoch

    def _unplace(self, seq: Sequence) -> tuple[int, int, int] | None:
        """Take the sequence off its node here: ``(seq id, node index, epoch)`` for ``NodeBook.release`` to free its
        KV there, None if it holds none; a prefill under way (chunked) is dropped with its K/V so far."""
        self.prefills.drop(seq.seq_id)
        if seq.status is not SeqStatus.RUNNING:
            return None
        node_index, seq.node_index = seq.node_index, None
        seq.status = SeqStatus.WAITING
        return seq.seq_id, node_index, seq.node_epoch

    async def _finish_all(self, ending: list[tuple[Sequence, TokenEvent, bool]]) -> None:
        """Leave the batch: forget each in the scheduler (``is_counted``: finished, else aborted), free their KV at
        once (one Free per node for them all), tell their streams."""
        if not ending:
            return
        self._held.emit({seq.seq_id for seq, _, _ in ending})  # a stream's events stay in order
        placed = []
        for seq, _, is_counted in ending:
            (self.scheduler.on_finished if is_counted else self.scheduler.abort)(seq.seq_id)
            self._sequences.pop(seq.seq_id, None)
            placed.append(self._unplace(seq))
        try:
            await self.node_book.release(placed)
        finally:
            for seq, event, _ in ending:
                seq.status = SeqStatus.FINISHED
                seq.emit(event)

    async def _reap(self) -> None:
        requested, self._abort_requested = self._abort_requested, {}
        seqs = [s for s in map(self._sequences.get, sorted(requested)) if s is not None]
        stops = [requested[seq.seq_id] and seq.status == SeqStatus.RUNNING for seq in seqs]
        await self._finish_all([(seq, seq.end_event("stop" if is_stop else "abort"), is_stop)
                                for seq, is_stop in zip(seqs, stops)])

    async def _fail(self, seqs: list[Sequence], message: str, *, is_retryable: bool = False) -> None:
        try:
            await self._finish_all([(seq, seq.end_event("error", message, is_retryable=is_retryable), False)
                                    for seq in seqs])
        except Exception:  # the node may be what failed; the requests have their error events anyway
            log.exception("freeing the failed sequences' KV failed")

    # ---- failed, draining and returning nodes -------------------------------------------------
    async def _apply_node_changes(self) -> None:
        """At a step boundary: follow the nodes (``NodeBook.follow``); with none left that attends, fail what runs,
        else what no node left could ever hold (requeued off a larger node that left), as ``submit`` refuses it."""
        stranded = await self.node_book.follow(self.scheduler, (s.node_index for s in self._sequences.values()),
                                               self._requeue)
        if not any(self.nodes[i].can_attend for i in self.scheduler.nodes) and self._sequences:
            reasons = "; ".join(f"{n.node_id}: {n.failure}" for n in self.nodes)
            await self._fail(list(self._sequences.values()), f"no KV node is left ({reasons})", is_retryable=True)
        elif stranded:  # what only a node that left (or came back smaller) could hold cannot wait for it
            await self._fail([self._sequences[i] for i in stranded], STRANDED, is_retryable=True)

    async def _requeue(self, seq_ids: list[int]) -> None:
        """The scheduler requeued sequences off a failed or draining node: drop their KV there, rebuild them later."""
        seqs = [self._sequences[seq_id] for seq_id in seq_ids]
        await self.node_book.release([self._unplace(seq) for seq in seqs])
        for seq in seqs:
            seq.is_recovering = True

    # ---- preemption and prefill --------------------------------------------------------------
    async def _preempt(self, seq: Sequence, node_index: int) -> None:
        log.info("node %d is full: preempting sequence %d (%d tokens out)", node_index, seq.seq_id,
                 len(seq.output_ids))
        seq.num_preemptions += 1
        self.num_preempted += 1
        await self.node_book.release([self._unplace(seq)])

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
        """Place a pass's prompts on their nodes (at once: each its own round trips), then sample the first token of
        each fresh one placed (a resumed sequence's next token comes from the next decode step)."""
        placed = await asyncio.gather(*(self._place(job, k, v) for job, (k, v) in zip(jobs, kvs)),
                                      return_exceptions=True)  # each handles its node's failure; others re-raised
        for outcome in placed:
            if isinstance(outcome, BaseException):
                raise outcome
        starting = [i for i, (job, is_placed) in enumerate(zip(jobs, placed)) if is_placed and not job.is_resumed]
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

    # ---- decode -------------------------------------------------------------------------------
    async def _decode(self, groups: list[list[Sequence]]) -> None:
        if not self.config.is_pipelined:
            groups = [[s for group in groups for s in group]]
        minibatches = [MiniBatch.build(i, group) for i, group in enumerate(groups)]
        ran = [[s.seq_id for s in mb.seqs] for mb in minibatches]  # the split as it runs
        predicted_s = self.scheduler.predict_decode_s(ran) if self.trace is not None else 0.0
        is_async_cuda = self.runner.is_cuda and not self.runner.is_synchronous  # a dense call returns at its launch
        if not (is_async_cuda and self.decoder.is_whole_step(minibatches)):
            self._held.emit()  # this step runs to its end before the await returns: they would wait all of it
        trace_start = self.trace.now() if self.trace is not None else 0.0
        start = time.perf_counter()
        logits = await self.decoder.run(minibatches, is_pipelined=self.config.is_pipelined)
        decode_s = time.perf_counter() - start
        self._held.emit()  # after a CUDA launch: the previous step's tokens go out while the GPU works
        if self.trace is not None:
            self.trace.add_step(self.decoder.step_index, trace_start, self.trace.now(),
                                sum(len(mb.seqs) for mb in minibatches))
            self.predicted_steps_s.append(predicted_s)
        all_alive = all(self.nodes[n].can_attend for mb in minibatches for n, _, _ in mb.node_slices)
        bytes_per_token_layer = self.kv_bytes_per_token / self.model.config.num_layers
        self.scheduler.observe_attend_calls([
            AttendCall(node_index, num_tokens * bytes_per_token_layer, start_s, end_s)
            for node_index, num_tokens, start_s, end_s in self.decoder.drain_attend_times()
            if self.nodes[node_index].can_attend])
        if all_alive:  # an untraced CUDA graph step returns at its launch, one launched ahead ran before it:
            # its time is not the step's
            is_timed = not is_async_cuda and not self.decoder.was_ahead
            self.scheduler.observe_decode(ran, decode_s, is_device_time_included=is_timed)
        # one sampler call for the whole step (rows are sampled independently). Rows whose node
        # failed during the step got zeros from it: no token for them now; they are rebuilt
        # elsewhere and decode this position again.
        all_seqs = [seq for mb in minibatches for seq in mb.seqs]
        all_logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        # only a node failing during the step unplaces rows (statuses change at step boundaries); rows a
        # node refused for want of room are preempted now and rebuilt later
        refused = set().union(*(self.nodes[n].take_refused() for mb in minibatches for n, _, _ in mb.node_slices))
        for seq in [s for s in all_seqs if s.seq_id in refused and self._is_placed(s)]:
            self.scheduler.preempt(seq.seq_id)
            await self._preempt(seq, seq.node_index)
        rows = (range(len(all_seqs)) if all_alive and not refused
                else [row for row, seq in enumerate(all_seqs) if self._is_placed(seq)])
        if len(rows) < len(all_seqs):
            log.warning("step %d: %d row(s) lost their node or its room; redone after the rebuild",
                        self.decoder.step_index, len(all_seqs) - len(rows))
            all_logits = all_logits[torch.tensor(rows, dtype=torch.long, device=all_logits.device)]
            all_seqs = [all_seqs[row] for row in rows]
        if all_seqs:
            # with nobody waiting, the next step most likely runs the same rows (or fewer, where some
            # finish): launch it ahead; an admission would discard it
            # (not in a traced run, whose steps are timed one by one)
            is_ahead = (self.config.is_launching_ahead and self.trace is None and not self.num_waiting
                        and self.decoder.can_launch_ahead(len(all_seqs)))
            await self._sample_and_emit(all_seqs, all_logits, is_ahead=is_ahead)

    async def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor, *, is_ahead: bool = False,
                               prompt_logprobs: list[tuple | None] | None = None) -> None:
        """Sample a token for each of ``seqs`` and hand it to its stream; ``prompt_logprobs``: those of each of the
        sequences a prefill just placed, which go with their first tokens."""
        rows = await self.runner.run(self.decoder.sample, seqs, logits, self._eos_tuple, self._generator, is_ahead)
        made_at = time.monotonic()  # the step's tokens' time, once for the batch
        self.scheduler.on_tokens([s.seq_id for s in seqs])
        ending = []
        for i, (seq, token_id, logprob, rank, top) in enumerate(zip(seqs, *rows)):
            seq.output_ids.append(token_id)
            if seq.matcher is not None:
                seq.matcher.accept_token(token_id)
            reason = finish_reason_after(seq, token_id, eos_token_ids=self.eos_token_ids,
                                         max_model_len=self.max_model_len)
            event = TokenEvent(seq.seq_id, token_id, len(seq.output_ids) - 1, logprob, top, reason,
                               prompt_logprobs=prompt_logprobs and prompt_logprobs[i], rank=rank, made_at=made_at)
            if reason is None:
                self._held.hold(seq, event)
            else:
                ending.append((seq, event, True))
        if ending:
            await self._finish_all(ending)
