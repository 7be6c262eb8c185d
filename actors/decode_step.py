"""One decode step of a set of mini-batches: dense work on the Executor, attention on KV nodes.

The whole step runs on the DenseRunner's thread, with no event-loop hop inside it.
Per layer and mini-batch: the dense part yields q, k, v for every row; rows are
ordered by node, so each node's share is one contiguous slice; the rows bound for
CPU shards are copied to the host once and each shard's slice goes out as one
Attend over the dense thread's own link to that shard (transport/link.py);
nodes on the Executor's device attend right away. The mini-batches take turns
layer by layer: while mini-batch A's attention is on the shards, B's outputs are
collected, its next dense segment runs and its next attends go out, then back to
A. With the pipeline off, the whole batch is one mini-batch and GPU and shards
strictly alternate. A step whose rows all live on the Executor's device runs as
one call (one CUDA graph replay where graphs were made).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fastdecode.actors.dense_runner import DenseRunner
from fastdecode.actors.kv_nodes import KVNode
from fastdecode.actors.layer_graphs import EagerDense, GraphDense, LayerGraphs
from fastdecode.actors.sampling import SampledRows, sample
from fastdecode.actors.sequence import Sequence
from fastdecode.actors.tensor_io import to_numpy
from fastdecode.actors.trace import StepTrace


@dataclass
class MiniBatch:
    index: int
    seqs: list[Sequence]  # ordered by node
    seq_ids: np.ndarray  # int64, same order
    node_slices: list[tuple[int, int, int]]  # (node index, start row, end row)
    slice_tokens: dict[int, int]  # start row of a node slice -> context tokens it attends over (all layers alike)

    @classmethod
    def build(cls, index: int, seqs: list[Sequence]) -> "MiniBatch":
        seqs = sorted(seqs, key=lambda s: (s.node_index, s.seq_id))
        slices: list[tuple[int, int, int]] = []
        for row, seq in enumerate(seqs):
            if slices and slices[-1][0] == seq.node_index:
                node, start, _ = slices[-1]
                slices[-1] = (node, start, row + 1)
            else:
                slices.append((seq.node_index, row, row + 1))
        tokens = {start: sum(s.num_tokens for s in seqs[start:end]) for _, start, end in slices}
        return cls(index, seqs, np.array([s.seq_id for s in seqs], dtype=np.int64), slices, tokens)


class _Call:
    """One node's attend in flight: ``ended`` is when its reply was first seen waiting, ``is_received`` once
    ``end_attend`` took the reply."""

    __slots__ = ("node_index", "start_row", "pending", "begun", "ended", "is_received")

    def __init__(self, node_index: int, start_row: int, pending: object, begun: float) -> None:
        self.node_index, self.start_row, self.pending, self.begun = node_index, start_row, pending, begun
        self.ended: float | None = None
        self.is_received = False


class _Staging:
    """One lane's pinned host buffers: q, k, v on their way to the shards and o on its way back.

    Reused every layer without ZeroMQ tracking, because the order of the step makes it safe: a lane's
    q/k/v buffers are written again only after every reply to the messages that carried them (those
    messages are zero-copy: ZeroMQ and an in-process shard read the buffers until then), and its o
    buffer only after the next host copy, which waits behind o's upload on the same stream. A node that
    fails is not waited for; whatever it still reads of the buffers goes nowhere.
    """

    def __init__(self, rows: int, model) -> None:
        cfg, dtype = model.config, model.dtype
        self.rows = rows
        self.qkv = tuple(torch.empty(rows, heads, cfg.head_dim, dtype=dtype, pin_memory=True)
                         for heads in (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads))
        self.qkv_arrays = tuple(to_numpy(t) for t in self.qkv)
        self.o = torch.empty(rows, cfg.num_heads, cfg.head_dim, dtype=dtype, pin_memory=True)
        self.o_array = to_numpy(self.o)


class DecodeStep:
    """Runs decode steps of a model over a set of KV nodes."""

    def __init__(self, model, nodes: list[KVNode], runner: DenseRunner, trace: StepTrace | None) -> None:
        self.model = model
        self.nodes = nodes
        self.runner = runner
        self.trace = trace
        self.step_index = 0
        self.graphs = None  # a cuda_graphs.StepGraphs: whole steps on the GPU KV node, as CUDA graphs
        self.layer_graphs: LayerGraphs | None = None  # dense segments between attends, as CUDA graphs
        self._attend_times: list[tuple[int, int, float, float]] = []  # (node, context tokens, start, end)
        self._in_flight: list[list[_Call]] = []  # each mini-batch's calls of the layered step running now
        self._staging: dict[int, _Staging] = {}  # by lane, CUDA only
        self._graph_rows: np.ndarray | None = None  # seq_ids of the last step, when it was one graph replay
        self.was_ahead = False  # the last step's logits came from a step launched ahead

    def drain_attend_times(self) -> list[tuple[int, int, float, float]]:
        """Measured attend calls since the last drain: (node index, tokens of context read, start, end),
        perf_counter seconds (the scheduler removes the overlap of calls queued on one node)."""
        times, self._attend_times = self._attend_times, []
        return times

    def is_whole_step(self, minibatches: list[MiniBatch]) -> bool:
        """The mini-batches' nodes all attend on the Executor's device now: each runs as one dense-thread call (on
        CUDA a launch, which returns before the device is done), not layer by layer with the nodes' round trips."""
        return all(self.nodes[n].can_attend_now for mb in minibatches for n, _, _ in mb.node_slices)

    async def run(self, minibatches: list[MiniBatch], *, is_pipelined: bool) -> list[torch.Tensor]:
        """Logits ``[rows, vocab]`` for each mini-batch, in order. ``is_pipelined``: the mini-batches
        take turns layer by layer (else each runs all its layers before the next starts)."""
        self.step_index += 1
        self._graph_rows, self.was_ahead = None, False
        if self.is_whole_step(minibatches):
            is_alone = len(minibatches) == 1  # (its logits may stay in the graph's buffer until sampled)
            return [await self._dense(mb, "step", self._whole_step, mb, is_alone) for mb in minibatches]
        if is_pipelined:
            return await self.runner.run(self._layered_step, minibatches)
        return [(await self.runner.run(self._layered_step, [mb], lane))[0] for lane, mb in enumerate(minibatches)]

    async def _dense(self, mb: MiniBatch, kind: str, fn, *args):
        if self.trace is None:
            return await self.runner.run(fn, *args)
        start = self.trace.now()
        result = await self.runner.run(fn, *args)
        self.trace.add(self.step_index, mb.index, "gpu", kind, start, self.trace.now())
        return result

    @staticmethod
    def _inputs(mb: MiniBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and positions of ``mb``'s rows on ``device`` (for the per-layer paths: making them
        waits for the device's queue, a step launched ahead included)."""
        tokens = torch.tensor([s.output_ids[-1] for s in mb.seqs], dtype=torch.long, device=device)
        positions = torch.tensor([s.num_tokens - 1 for s in mb.seqs], dtype=torch.long, device=device)
        return tokens, positions

    def _whole_step(self, mb: MiniBatch, is_alone: bool = False) -> torch.Tensor:
        """Every layer of a mini-batch whose nodes all live on the Executor's device, in one call."""
        model = self.model
        if self._is_on_graph_node(mb):  # one replay; None: the slots fit no bucket
            taken = self.graphs.num_ahead_taken
            logits = self.graphs.run(mb.seq_ids, [s.output_ids[-1] for s in mb.seqs], is_view_ok=is_alone)
            if logits is not None:
                self._graph_rows, self.was_ahead = mb.seq_ids, self.graphs.num_ahead_taken > taken
                return logits
        program = EagerDense(model, *self._inputs(mb, model.device))
        q, k, v = program.first()
        for layer in range(model.num_layers - 1):
            q, k, v = program.middle(layer, self._attend_now(mb, layer, q, k, v))
        return program.last(self._attend_now(mb, model.num_layers - 1, q, k, v))

    def can_launch_ahead(self, num_rows: int) -> bool:
        """The last step was one graph replay over ``num_rows`` rows (so the next can be launched ahead)."""
        return self._graph_rows is not None and len(self._graph_rows) == num_rows

    def sample(self, seqs: list[Sequence], logits: torch.Tensor, eos_token_ids: tuple[int, ...],
               generator: torch.Generator, is_ahead: bool = False) -> SampledRows:
        """On the dense thread: a token for each of ``seqs`` (``sampling.sample``), with logprobs, as host values.
        ``is_ahead``: launch the next step with the sampled tokens before they reach the host."""
        out = sample(logits, [s.sampling_row for s in seqs], eos_token_ids=eos_token_ids, generator=generator)
        fields = out.tensors
        if is_ahead and self.runner.is_cuda:  # copied out on the side stream, so reading them waits only for them
            fields, copied = self.runner.start_host_copies(fields)
            is_ahead = self.graphs.launch_ahead(self._graph_rows, out.token_ids)
            copied.synchronize()
        elif is_ahead:
            is_ahead = self.graphs.launch_ahead(self._graph_rows, out.token_ids)
        rows = out.rows([t.tolist() for t in fields], [s.params.logprobs for s in seqs])
        if is_ahead:
            self.graphs.confirm_ahead(rows.token_ids)
        return rows

    def _is_on_graph_node(self, mb: MiniBatch) -> bool:
        """Every row of ``mb`` is on the node the step graphs were made for."""
        if self.graphs is None or len(mb.node_slices) != 1:
            return False
        node = self.nodes[mb.node_slices[0][0]]
        return getattr(node, "inner", node) is self.graphs.node

    def _attend_now(self, mb: MiniBatch, layer: int, q, k, v) -> torch.Tensor:
        """Attention for a mini-batch whose nodes all live on the Executor's device."""
        parts = [self.nodes[n].attend_now(layer, mb.seq_ids[start:end], q[start:end], k[start:end], v[start:end])
                 for n, start, end in mb.node_slices]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ---- the layered step, on the dense thread ---------------------------------------------------
    def _layered_step(self, minibatches: list[MiniBatch], first_lane: int = 0) -> list[torch.Tensor]:
        num_layers = self.model.num_layers
        dense = [self.dense_program(*self._inputs(mb, self.model.device), first_lane + i)
                 for i, mb in enumerate(minibatches)]
        staging = [self._staging_for(first_lane + i, len(mb.seqs)) for i, mb in enumerate(minibatches)]
        pending: list[list[_Call]] = []
        self._in_flight = pending
        for mb, program, buffers in zip(minibatches, dense, staging):
            start = self._now()
            pending.append(self._send(mb, 0, *program.first(), start, buffers))
        logits: list[torch.Tensor] = [None] * len(minibatches)  # type: ignore[list-item]
        for layer in range(num_layers):
            for i, mb in enumerate(minibatches):
                o = self._collect(mb, pending[i], staging[i])
                start = self._now()
                if layer + 1 < num_layers:
                    pending[i] = self._send(mb, layer + 1, *dense[i].middle(layer, o), start, staging[i])
                else:
                    logits[i] = dense[i].last(o)
                    self._trace_dense(mb, "dense", start)
        return logits

    def dense_program(self, tokens: torch.Tensor, positions: torch.Tensor, lane: int) -> EagerDense | GraphDense:
        """The dense segments of a mini-batch of these rows on ``lane``: CUDA graph replays where made and the
        batch fits, else eager."""
        if self.layer_graphs is not None:
            segments = self.layer_graphs.segments(lane, tokens.shape[0])
            if segments is not None:
                return GraphDense(self.layer_graphs, segments, tokens, positions)
        return EagerDense(self.model, tokens, positions)

    def _staging_for(self, lane: int, num_rows: int) -> _Staging | None:
        if not self.runner.is_cuda:
            return None
        staging = self._staging.get(lane)
        if staging is None or staging.rows < num_rows:
            staging = self._staging[lane] = _Staging(num_rows, self.model)
        return staging

    def _now(self) -> float:
        return self.trace.now() if self.trace is not None else 0.0

    def _trace_dense(self, mb: MiniBatch, kind: str, start: float) -> None:
        if self.trace is not None:
            self.trace.add(self.step_index, mb.index, "gpu", kind, start, self.trace.now())

    def _note_arrivals(self, heads: dict[int, list[_Call]] | None = None) -> float:
        """Stamp the calls whose replies are in: a node's time ends when its reply is there, not when this
        thread gets round to it (the scheduler learns service times from it). Calls seen in one poll share
        its clock reading, which is returned. ``heads``: ``_oldest_calls()``, when the caller has it."""
        now = time.perf_counter()
        for first, *_ in (self._oldest_calls() if heads is None else heads).values():
            if first.ended is None and self.nodes[first.node_index].is_attend_done(first.pending):
                first.ended = now
        return now

    def _oldest_calls(self) -> dict[int, list[_Call]]:
        """Each node's two oldest calls whose replies are not received yet, oldest first. Only the first is one
        ``is_attend_done`` can speak for, since a node answers its calls in the order they went out and its
        link only tells that some reply is waiting; the second is the one after it (``_collect``)."""
        oldest: dict[int, list[_Call]] = {}
        for calls in self._in_flight:
            for call in calls:
                if not call.is_received:
                    pair = oldest.setdefault(call.node_index, [])
                    pair.append(call)
                    if len(pair) > 1:
                        pair.sort(key=lambda c: c.begun)
                        del pair[2:]
        return oldest

    def _send(self, mb: MiniBatch, layer: int, q, k, v, dense_start: float,
              staging: _Staging | None) -> list[_Call]:
        """Start every node's attend for ``mb`` at ``layer``: shards first (their rows copied to the host
        once, which waits for the dense work), then the nodes on the Executor's device."""
        slices = mb.node_slices
        on_host = [self.nodes[n].is_host for n, _, _ in slices]
        host = None
        if any(on_host):
            host = self.runner.host_copies(q, k, v, out=staging.qkv if staging else None,
                                           while_waiting=self._note_arrivals)
            if staging is not None:  # numpy views: slicing them per node is cheaper than slicing tensors
                host = staging.qkv_arrays
        self._trace_dense(mb, "dense", dense_start)
        calls: list[_Call] = []
        for is_host in (True, False):
            for (n, start, end), node_is_host in zip(slices, on_host):
                if node_is_host is is_host:
                    hq, hk, hv = host if is_host else (q, k, v)
                    begun = time.perf_counter()
                    pending = self.nodes[n].begin_attend(layer, mb.seq_ids[start:end], hq[start:end],
                                                         hk[start:end], hv[start:end])
                    calls.append(_Call(n, start, pending, begun))
        calls.sort(key=lambda c: c.start_row)  # back to row order
        return calls

    def _collect(self, mb: MiniBatch, calls: list[_Call], staging: _Staging | None) -> torch.Tensor:
        """Wait for ``calls``; their outputs in row order, on the Executor's device."""
        heads = self._oldest_calls()
        looked = self._note_arrivals(heads)
        parts: list[torch.Tensor] = []
        for call in calls:
            node = self.nodes[call.node_index]
            parts.append(node.end_attend(call.pending))
            call.is_received = True
            seen = time.perf_counter()
            # the node's next call, in another mini-batch
            after = next((c for c in heads.get(call.node_index, ()) if c is not call), None)
            if after is not None and after.ended is None and node.is_attend_done(after.pending):
                # the node's next reply was in as soon as this one was taken: both ended before this look, in a
                # split this thread cannot tell, so both end at this reading (one observation); but a call
                # stamped at an earlier look (with the call before it) keeps that stamp
                if call.ended is None or call.ended >= looked:
                    call.ended = seen
                after.ended = seen
            elif call.ended is None:
                call.ended = seen
            ended = call.ended
            self._attend_times.append((call.node_index, mb.slice_tokens[call.start_row], call.begun, ended))
            if self.trace is not None:
                origin = self.trace.origin_s
                self.trace.add(self.step_index, mb.index, node.node_id, "attend", call.begun - origin,
                               ended - origin)
        device = self.model.device
        on_host = [p.device != device for p in parts]
        if any(on_host):  # the shards' rows join on the host and go up in one copy
            joined = self._join_on_host([p for p, h in zip(parts, on_host) if h], staging)
            if all(on_host):
                return joined
            uploaded = iter(joined.split([p.shape[0] for p, h in zip(parts, on_host) if h]))
            parts = [next(uploaded) if h else p for p, h in zip(parts, on_host)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _join_on_host(self, parts: list[torch.Tensor], staging: _Staging | None) -> torch.Tensor:
        if staging is None:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        row = 0
        for part in parts:
            staging.o[row:row + part.shape[0]].copy_(part)
            row += part.shape[0]
        return self.runner.upload(staging.o[:row])
