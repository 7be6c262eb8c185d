"""The whole decode step of a GPU-KV mini-batch as one CUDA graph per batch bucket.

For a mini-batch whose rows all live on the GPU KV node, a decode step is one
fixed program: embed, then for every layer the dense QKV part, the new k, v
written into the rows' slots, attention over the slots, the O-projection and MLP,
then the logits. ``step_program`` is that program over static buffers: row ``r``
of a bucket of ``rows`` rows IS slot ``r`` of the pool (a view, no gather), and
the per-step values (token ids, RoPE positions, write columns, lengths) are
device tensors, the mask is built on the device from the lengths. Nothing in it
depends on a host value, so it is captured once per bucket (powers of two, and
the node's slot count as the top bucket) and replayed by one call.

A mini-batch runs as a graph when its slots all fall below the bucket of its row
count (the usual case: slots are handed out lowest first). Slots of the bucket
that are not in the mini-batch are padding: token 0, position 0, length 1, and
their k, v go to the pool's scratch column, so they touch no real KV; every op is
row-wise, so they never affect real rows. Otherwise the caller runs the eager
per-layer path. Capture runs lazily on the dense thread the first time a bucket
is used, after an eager warm-up over all-padding buffers. ``is_graphed=False``
runs the same program eagerly (CPU tests, and the eager comparison).
``profile`` times whole steps by batch size for the scheduler's step model.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from fastdecode.actors.gpu_kv import GpuKVNode

# rows of the per-step int64 staging buffer
_TOKENS, _POSITIONS, _COLUMNS, _LENGTHS, _ROW_SLOTS = range(5)


def bucket_for(batch: int) -> int:
    """The smallest power of two holding ``batch`` rows."""
    return 1 << max(0, batch - 1).bit_length()


def step_program(model, node: GpuKVNode, inputs: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Logits ``[rows, vocab]`` of one decode step over slots ``0..rows-1``, from ``inputs[5, rows]``."""
    tokens, positions, columns, lengths = inputs[_TOKENS], inputs[_POSITIONS], inputs[_COLUMNS], inputs[_LENGTHS]
    mask = node.static_mask(lengths)
    x = model.embed(tokens)
    for layer in range(model.num_layers):
        q, k, v = model.pre_attention(layer, x, positions)
        o = node.attend_static(layer, row_index, columns, mask, q, k, v)
        x = model.post_attention(layer, x, o)
    return model.logits(x)


class _Bucket:
    """Static buffers of one bucket, and its graph (None when run eagerly)."""

    def __init__(self, model, node: GpuKVNode, rows: int, *, pool) -> None:
        device = model.device
        self.rows = rows
        self.inputs = torch.zeros(5, rows, dtype=torch.long, device=device)
        self.inputs.copy_(torch.from_numpy(padding_inputs(node, rows)))
        self.row_index = torch.arange(rows, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if pool is None:
            self.logits = None
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: kernels chosen, workspaces made; writes only scratch columns
            for _ in range(2):
                step_program(model, node, self.inputs, self.row_index)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = step_program(model, node, self.inputs, self.row_index)


def padding_inputs(node: GpuKVNode, rows: int) -> np.ndarray:
    """Staging values of a bucket whose rows are all padding."""
    inputs = np.zeros((5, rows), dtype=np.int64)
    inputs[_COLUMNS] = node.scratch_column
    inputs[_LENGTHS] = 1
    return inputs


class StepGraphs:
    """Whole decode steps on one GPU KV node, replayed as CUDA graphs by batch bucket."""

    def __init__(self, model, node: GpuKVNode, *, max_batch: int, is_graphed: bool = True) -> None:
        if is_graphed and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.node = node
        self.is_graphed = is_graphed
        self.max_rows = min(bucket_for(max_batch), node.num_slots)
        self._buckets: dict[int, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if is_graphed else None
        self.num_replays = 0
        self.num_fallbacks = 0  # mini-batches left to the eager path (slots past their bucket)

    def rows_for(self, slots: np.ndarray) -> int | None:
        """The bucket that holds these slots as rows, or None when they do not fit one."""
        rows = min(bucket_for(len(slots)), self.node.num_slots)
        if len(slots) == 0 or rows > self.max_rows or int(slots.max()) >= rows:
            return None
        return rows

    def run(self, seq_ids: np.ndarray, token_ids: list[int]) -> torch.Tensor | None:
        """Logits ``[len(seq_ids), vocab]`` of a decode step, rows in ``seq_ids`` order; None (and
        nothing changed) when the rows' slots do not fit a bucket. Runs on the dense thread."""
        slots = self.node.slots_of(seq_ids)
        rows = self.rows_for(slots)
        if rows is None:
            self.num_fallbacks += 1
            return None
        lengths = self.node.advance(slots)
        staging = padding_inputs(self.node, rows)
        staging[_TOKENS, slots] = token_ids
        staging[_POSITIONS, slots] = lengths - 1
        staging[_COLUMNS, slots] = lengths - 1
        staging[_LENGTHS, slots] = lengths
        staging[_ROW_SLOTS, :len(slots)] = slots
        bucket = self._bucket(rows)
        host = torch.from_numpy(staging)
        if self.is_graphed:
            bucket.inputs.copy_(host.pin_memory(), non_blocking=True)
            bucket.graph.replay()
            logits = bucket.logits
        else:
            bucket.inputs.copy_(host)
            logits = step_program(self.model, self.node, bucket.inputs, bucket.row_index)
        self.num_replays += 1
        return logits.index_select(0, bucket.inputs[_ROW_SLOTS, :len(slots)])

    def profile(self, batches, *, repeats: int = 3) -> list[tuple[int, float]]:
        """(batch, best-of-``repeats`` seconds of one whole step) for each batch that runs as a graph:
        its bucket's program over padding rows (a replay on CUDA; it writes only scratch columns), what
        the scheduler's whole-step model starts from. Captures those buckets. Runs on the dense thread."""
        samples = []
        for batch in sorted(set(batches)):
            rows = min(bucket_for(batch), self.node.num_slots)
            if rows > self.max_rows:
                continue  # never a graph: the eager path runs it
            bucket = self._bucket(rows)
            bucket.inputs.copy_(torch.from_numpy(padding_inputs(self.node, rows)))
            best = float("inf")
            for repeat in range(repeats + 1):  # the first is a warm-up
                if self.is_graphed:
                    torch.cuda.synchronize(self.model.device)
                start = time.perf_counter()
                if self.is_graphed:
                    bucket.graph.replay()
                    torch.cuda.synchronize(self.model.device)
                else:
                    step_program(self.model, self.node, bucket.inputs, bucket.row_index)
                if repeat:
                    best = min(best, time.perf_counter() - start)
            samples.append((batch, best))
        return samples

    def _bucket(self, rows: int) -> _Bucket:
        bucket = self._buckets.get(rows)
        if bucket is None:
            bucket = self._buckets[rows] = _Bucket(self.model, self.node, rows, pool=self._pool)
        return bucket
