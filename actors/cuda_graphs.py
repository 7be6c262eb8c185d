"""CUDA graphs of the dense per-layer segments, one set per (mini-batch, batch-size bucket).

A decode step's dense work is a chain of segments between attentions:
``embed + pre_attention(0)``, then for each layer ``post_attention(i) +
pre_attention(i + 1)``, then ``post_attention(L - 1) + logits``. Each segment is
captured once per padded batch size (powers of two) and replayed: one launch
instead of a few dozen kernels, so the host's work per layer no longer grows with
the kernels or the batch. Segment ``i + 1`` reads segment ``i``'s output tensor in
place (captured that way), so only the attention output ``o`` and, once per step,
the token ids and positions are copied into static buffers. Rows past the real
batch are padding: every op of the dense part is row-wise, so they never touch
real rows. Two mini-batches in flight get separate graph sets (their buffers must
not alias). Capture runs lazily on the dense thread, the first time a bucket is
used; CUDA only.
"""
from __future__ import annotations

import torch


def bucket_for(batch: int) -> int:
    """The smallest power of two holding ``batch`` rows."""
    return 1 << max(0, batch - 1).bit_length()


class _GraphSet:
    """The captured chain of one bucket: static inputs, the graphs and their outputs."""

    def __init__(self, model, rows: int, pool) -> None:
        cfg = model.config
        device, dtype = model.device, model.dtype
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.o = [torch.zeros(rows, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
                  for _ in range(cfg.num_layers)]
        num_layers = model.num_layers

        def first():
            x = model.embed(self.tokens)
            return (x, *model.pre_attention(0, x, self.positions))

        def middle(layer, x):
            x = model.post_attention(layer, x, self.o[layer])
            return (x, *model.pre_attention(layer + 1, x, self.positions))

        def run_all():  # eager pass: warms up kernels and the allocator before capture
            out = first()
            for layer in range(num_layers - 1):
                out = middle(layer, out[0])
            return model.logits(model.post_attention(num_layers - 1, out[0], self.o[-1]))

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run_all()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[tuple[torch.Tensor, ...]] = []
        self.outputs.append(self._capture(first, pool))
        for layer in range(num_layers - 1):
            x = self.outputs[-1][0]
            self.outputs.append(self._capture(lambda layer=layer, x=x: middle(layer, x), pool))
        x = self.outputs[-1][0]
        self.outputs.append(
            self._capture(lambda: (model.logits(model.post_attention(num_layers - 1, x, self.o[-1])),), pool))

    def _capture(self, fn, pool) -> tuple[torch.Tensor, ...]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
        self.graphs.append(graph)
        return out


class DenseGraphs:
    """Replays of the dense segments for batches up to ``max_batch`` rows."""

    def __init__(self, model, *, max_batch: int) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.max_batch = bucket_for(max_batch)
        self._sets: dict[tuple[int, int], _GraphSet] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def can_run(self, batch: int) -> bool:
        return 1 <= batch <= self.max_batch

    def _set(self, minibatch: int, batch: int) -> _GraphSet:
        key = (minibatch, bucket_for(batch))
        graph_set = self._sets.get(key)
        if graph_set is None:
            graph_set = self._sets[key] = _GraphSet(self.model, key[1], self._pool)
        return graph_set

    # The three segment calls the decode step makes, on the dense thread.
    def first(self, minibatch: int, tokens: torch.Tensor, positions: torch.Tensor):
        num_rows = tokens.shape[0]
        graph_set = self._set(minibatch, num_rows)
        graph_set.tokens[:num_rows].copy_(tokens)
        graph_set.positions[:num_rows].copy_(positions)
        graph_set.graphs[0].replay()
        return _rows(graph_set.outputs[0], num_rows)

    def middle(self, minibatch: int, layer: int, o: torch.Tensor):
        num_rows = o.shape[0]
        graph_set = self._set(minibatch, num_rows)
        graph_set.o[layer][:num_rows].copy_(o)
        graph_set.graphs[layer + 1].replay()
        return _rows(graph_set.outputs[layer + 1], num_rows)

    def last(self, minibatch: int, o: torch.Tensor) -> torch.Tensor:
        num_rows = o.shape[0]
        graph_set = self._set(minibatch, num_rows)
        graph_set.o[-1][:num_rows].copy_(o)
        graph_set.graphs[-1].replay()
        return graph_set.outputs[-1][0][:num_rows]


def _rows(outputs: tuple[torch.Tensor, ...], num_rows: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[:num_rows] for t in outputs)
