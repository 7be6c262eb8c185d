"""One decode step of a set of mini-batches: dense work on the Executor, attention on KV nodes.

Per layer and mini-batch: the dense part yields q, k, v for every row; rows are
ordered by node, so each node's share is one contiguous slice and goes out as one
attend message; the outputs come back and the dense part goes on. Mini-batches run
as concurrent coroutines: while one awaits its attention, the other's dense work
runs on the DenseRunner's thread. With the pipeline off, the whole batch is one
mini-batch and GPU and shards strictly alternate.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import torch

from fastdecode.actors.dense_runner import DenseRunner
from fastdecode.actors.kv_nodes import KVNode
from fastdecode.actors.sequence import Sequence
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


class DecodeStep:
    """Runs decode steps of a model over a set of KV nodes."""

    def __init__(self, model, nodes: list[KVNode], runner: DenseRunner, trace: StepTrace | None) -> None:
        self.model = model
        self.nodes = nodes
        self.runner = runner
        self.trace = trace
        self.step_index = 0
        self.graphs = None  # a cuda_graphs.StepGraphs: whole steps on the GPU KV node, as CUDA graphs
        self._attend_times: list[tuple[int, int, float, float]] = []  # (node, context tokens, start, end)

    def drain_attend_times(self) -> list[tuple[int, int, float, float]]:
        """Measured attend calls since the last drain: (node index, tokens of context read, start, end),
        perf_counter seconds (the scheduler removes the overlap of calls queued on one node)."""
        times, self._attend_times = self._attend_times, []
        return times

    async def run(self, minibatches: list[MiniBatch], *, is_pipelined: bool) -> list[torch.Tensor]:
        """Logits ``[rows, vocab]`` for each mini-batch, in order."""
        self.step_index += 1
        if is_pipelined and len(minibatches) > 1:
            return list(await asyncio.gather(*(self._run_minibatch(mb) for mb in minibatches)))
        return [await self._run_minibatch(mb) for mb in minibatches]

    async def _dense(self, mb: MiniBatch, kind: str, fn, *args):
        if self.trace is None:
            return await self.runner.run(fn, *args)
        start = self.trace.now()
        result = await self.runner.run(fn, *args)
        self.trace.add(self.step_index, mb.index, "gpu", kind, start, self.trace.now())
        return result

    async def _run_minibatch(self, mb: MiniBatch) -> torch.Tensor:
        model = self.model
        device = model.device
        token_ids = [s.output_ids[-1] for s in mb.seqs]
        position_ids = [s.num_tokens - 1 for s in mb.seqs]

        def first(tokens, positions):
            x = model.embed(tokens)
            return (x, *model.pre_attention(0, x, positions))

        def middle(layer, x, o, positions):
            x = model.post_attention(layer, x, o)
            return (x, *model.pre_attention(layer + 1, x, positions))

        def last(layer, x, o):
            return model.logits(model.post_attention(layer, x, o))

        num_layers = model.num_layers
        if all(self.nodes[n].can_attend_now for n, _, _ in mb.node_slices):
            graphs = self.graphs if self._is_on_graph_node(mb) else None

            def whole_step():  # every layer on the dense thread, no hops
                if graphs is not None:  # one replay; None: the slots fit no bucket
                    logits = graphs.run(mb.seq_ids, token_ids)
                    if logits is not None:
                        return logits
                tokens = torch.tensor(token_ids, dtype=torch.long, device=device)
                positions = torch.tensor(position_ids, dtype=torch.long, device=device)
                x, q, k, v = first(tokens, positions)
                for layer in range(num_layers):
                    o = self._attend_now(mb, layer, q, k, v)
                    if layer + 1 < num_layers:
                        x, q, k, v = middle(layer, x, o, positions)
                return last(num_layers - 1, x, o)

            return await self._dense(mb, "step", whole_step)

        tokens = torch.tensor(token_ids, dtype=torch.long, device=device)
        positions = torch.tensor(position_ids, dtype=torch.long, device=device)
        x, q, k, v = await self._dense(mb, "qkv", first, tokens, positions)
        for layer in range(num_layers):
            o = await self._attend(mb, layer, q, k, v)
            if layer + 1 < num_layers:
                x, q, k, v = await self._dense(mb, "dense", middle, layer, x, o, positions)
        return await self._dense(mb, "dense", last, num_layers - 1, x, o)

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

    async def _attend(self, mb: MiniBatch, layer: int, q, k, v) -> torch.Tensor:
        needs_host = any(self.nodes[n].is_host for n, _, _ in mb.node_slices)
        host = await self.runner.to_host(q, k, v) if needs_host else None
        parts = await asyncio.gather(
            *(self._attend_node(mb, layer, n, start, end, q, k, v, host) for n, start, end in mb.node_slices)
        )
        if len(parts) == 1:
            o = parts[0]
        elif all(p.device == parts[0].device for p in parts):
            o = torch.cat(parts)  # shards' outputs join on the host and go up in one copy below
        else:
            o = torch.cat([p.to(q.device) for p in parts])
        return await self.runner.to_device(o) if o.device != q.device else o

    async def _attend_node(self, mb, layer, node_index, start, end, q, k, v, host):
        node = self.nodes[node_index]
        if node.is_host:
            q, k, v = host
        rows = slice(start, end)
        t0 = time.perf_counter()
        o = await node.attend(layer, mb.seq_ids[rows], q[rows], k[rows], v[rows])
        t1 = time.perf_counter()
        self._attend_times.append((node_index, mb.slice_tokens[start], t0, t1))
        if self.trace is not None:
            origin = self.trace.origin_s
            self.trace.add(self.step_index, mb.index, node.node_id, "attend", t0 - origin, t1 - origin)
        return o
