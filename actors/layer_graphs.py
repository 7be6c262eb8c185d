"""The dense segments between attention calls, as CUDA graphs by batch bucket.

When attention runs on CPU shards, a decode step is ``num_layers + 1`` dense
segments with an attend between each two: embed + layer 0's QKV; then for each
layer the O-projection, MLP and the next layer's QKV; finally the last layer's
O-projection, MLP and the logits. Launched eagerly, one segment of Llama-3-8B is
about 25 kernels and ~1.3 ms of Python on the H100 host, several times its GPU
time. Here each segment is captured once per (lane, bucket) and replayed with one
call.

A bucket of ``rows`` rows (powers of two) owns static buffers: token ids,
positions, the residual ``x``, the attention output ``o``, and the outputs ``q``,
``k``, ``v`` and ``logits``. Every segment reads and writes only these (its last
ops copy into them), so its intermediates can share one memory pool with every
other segment: replays run one after another on one stream. A mini-batch of
``n`` rows uses rows ``0..n-1``; the padding rows hold zeros at first and then
whatever they compute, and every op is row-wise, so they never touch real rows.
Lanes are the mini-batches of a pipelined step (each needs its own buffers while
the other's attention is in flight). Capture is lazy, on the dense thread, the
first time a (lane, bucket) is used, after an eager warm-up.
"""
from __future__ import annotations

import torch

from fastdecode.actors.cuda_graphs import bucket_for


class _Segments:
    """One lane's bucket: static buffers and the ``num_layers + 1`` segment graphs."""

    def __init__(self, model, rows: int, pool) -> None:
        cfg = model.config
        device, dtype = model.device, model.dtype
        self.rows = rows
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.x = torch.zeros(rows, cfg.hidden_size, dtype=dtype, device=device)
        self.o = torch.zeros(rows, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.q = torch.zeros(rows, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(rows, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.logits = torch.zeros(rows, cfg.vocab_size, dtype=torch.float32, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: kernels chosen, workspaces made
            for segment in range(model.num_layers + 1):
                self._program(model, segment)
        torch.cuda.current_stream(device).wait_stream(side)
        for segment in range(model.num_layers + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._program(model, segment)
            self.graphs.append(graph)
        self.x.zero_()

    def _program(self, model, segment: int) -> None:
        """Segment ``segment``: 0 = embed + QKV of layer 0; i = layer i-1's rest + QKV of layer i; the last
        one (num_layers) = the last layer's rest + logits."""
        num_layers = model.num_layers
        if segment == 0:
            x = model.embed(self.tokens)
        else:
            x = model.post_attention(segment - 1, self.x, self.o)
        if segment == num_layers:
            self.logits.copy_(model.logits(x))
            return
        q, k, v = model.pre_attention(segment, x, self.positions)
        self.x.copy_(x)
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)


class LayerGraphs:
    """Dense segments of shard-path decode steps, replayed as CUDA graphs; see the module docstring."""

    def __init__(self, model, *, max_batch: int) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.max_rows = bucket_for(max_batch)
        self._segments: dict[tuple[int, int], _Segments] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.num_replays = 0

    def segments(self, lane: int, num_rows: int) -> _Segments | None:
        """The buffers and graphs for ``num_rows`` rows on ``lane``; None past the largest bucket."""
        rows = bucket_for(num_rows)
        if rows > self.max_rows:
            return None
        key = (lane, rows)
        segments = self._segments.get(key)
        if segments is None:
            segments = self._segments[key] = _Segments(self.model, rows, self._pool)
        return segments


class GraphDense:
    """One mini-batch's dense work through a lane's graphs: the same calls as ``EagerDense``."""

    def __init__(self, graphs: LayerGraphs, segments: _Segments, tokens: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self._graphs = graphs
        self._segments = segments
        self._num_rows = tokens.shape[0]
        segments.tokens[:self._num_rows].copy_(tokens, non_blocking=True)
        segments.positions[:self._num_rows].copy_(positions, non_blocking=True)

    def _replay(self, segment: int) -> None:
        self._segments.graphs[segment].replay()
        self._graphs.num_replays += 1

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, s = self._num_rows, self._segments
        return s.q[:n], s.k[:n], s.v[:n]

    def first(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._replay(0)
        return self._qkv()

    def middle(self, layer: int, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._segments.o[:self._num_rows].copy_(o, non_blocking=True)
        self._replay(layer + 1)
        return self._qkv()

    def last(self, o: torch.Tensor) -> torch.Tensor:
        self._segments.o[:self._num_rows].copy_(o, non_blocking=True)
        self._replay(len(self._segments.graphs) - 1)
        return self._segments.logits[:self._num_rows].clone()  # the buffer is the next step's


class EagerDense:
    """One mini-batch's dense work, op by op."""

    def __init__(self, model, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self._model = model
        self._tokens = tokens
        self._positions = positions
        self._x: torch.Tensor | None = None

    def first(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._x = self._model.embed(self._tokens)
        return self._model.pre_attention(0, self._x, self._positions)

    def middle(self, layer: int, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._x = self._model.post_attention(layer, self._x, o)
        return self._model.pre_attention(layer + 1, self._x, self._positions)

    def last(self, o: torch.Tensor) -> torch.Tensor:
        return self._model.logits(self._model.post_attention(self._model.num_layers - 1, self._x, o))
