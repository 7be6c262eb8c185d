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

A mini-batch runs in the smallest bucket that holds its row count and its highest
slot (slots are handed out lowest first, so that is usually the bucket of its row
count; once rows in the middle finish, a larger one). Slots of the bucket
that are not in the mini-batch are padding: token 0, position 0, length 1, and
their k, v go to the pool's scratch column, so they touch no real KV; every op is
row-wise, so they never affect real rows. Slots past the top bucket (more than
``max_batch`` rows' worth) leave the mini-batch to the caller's eager per-layer
path. Capture runs lazily on the dense thread the first time a bucket
is used, after an eager warm-up over all-padding buffers. ``is_graphed=False``
runs the same program eagerly (CPU tests, and the eager comparison).
``profile`` times whole steps by batch size for the scheduler's step model.

Launching ahead hides the host's time between steps: right after a step's tokens are
sampled on the device, ``launch_ahead`` replays the next step with those tokens fed
from the device (the host knows every other input: each row's length grows by one),
before the host has seen them. The next ``run`` over the same rows, or over some of
them (rows that finished or were preempted meanwhile are dropped), takes that step's
logits instead of replaying; rows it does not know (a new admission) discard it. A
discarded step changed nothing the host tracks: lengths advance only when a step is
taken, and what it wrote lies past its rows' lengths (never read, overwritten when the
row gets there; a freed slot's next owner writes its prompt after it, in stream order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fastdecode.actors.gpu_kv import GpuKVNode
from fastdecode.actors.tensor_io import upload

# rows of the per-step int64 staging buffer
_TOKENS, _POSITIONS, _COLUMNS, _LENGTHS, _ROW_SLOTS = range(5)


def bucket_for(batch: int) -> int:
    """The smallest power of two holding ``batch`` rows."""
    return 1 << max(0, batch - 1).bit_length()


def step_program(model, node: GpuKVNode, inputs: torch.Tensor) -> torch.Tensor:
    """Logits ``[rows, vocab]`` of one decode step over slots ``0..rows-1``, from ``inputs[5, rows]``: the
    dense parts as ``step_first``/``step_between`` (a layer's post-attention part and the next layer's
    pre-attention part in one call)."""
    tokens, positions, columns, lengths = inputs[_TOKENS], inputs[_POSITIONS], inputs[_COLUMNS], inputs[_LENGTHS]
    mask, write_index = node.static_mask(lengths), node.static_write_index(columns)  # once per step
    cos, sin = model.rope_at(positions)
    x = model.embed(tokens)
    q = model.step_first(x, cos, sin, node.kv_rows(0), write_index)
    last = model.num_layers - 1
    for layer in range(last):
        o = node.attend_static(layer, mask, q)
        x, q = model.step_between(layer, x, o, cos, sin, node.kv_rows(layer + 1), write_index)
    return model.logits(model.post_attention(last, x, node.attend_static(last, mask, q)))


@dataclass
class _Ahead:
    """A step launched ahead of the host: its rows and the lengths it ran them at."""

    bucket: "_Bucket"
    lengths: dict[int, int]  # seq_id -> the length its row ran at
    tokens: dict[int, int] | None = None  # seq_id -> the token it was fed, once the host has them


class _Bucket:
    """Static buffers of one bucket, and its graph (None when run eagerly)."""

    def __init__(self, model, node: GpuKVNode, rows: int, *, pool) -> None:
        device = model.device
        self.rows = rows
        self.inputs = torch.zeros(5, rows, dtype=torch.long, device=device)
        self.inputs.copy_(torch.from_numpy(padding_inputs(node, rows)))
        self.graph: torch.cuda.CUDAGraph | None = None
        if pool is None:
            self.logits = None
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: kernels chosen, workspaces made; writes only scratch columns
            for _ in range(2):
                step_program(model, node, self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = step_program(model, node, self.inputs)


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
        self.num_fallbacks = 0  # mini-batches left to the eager path (slots past the top bucket)
        self.num_ahead_taken = 0  # steps launched ahead whose logits a run took
        self.num_ahead_discarded = 0
        self._ahead: _Ahead | None = None

    def rows_for(self, slots: np.ndarray) -> int | None:
        """The bucket that holds these slots as rows, or None when they do not fit one."""
        if len(slots) == 0:
            return None
        rows = min(bucket_for(max(len(slots), int(slots.max()) + 1)), self.node.num_slots)
        return None if rows > self.max_rows or int(slots.max()) >= rows else rows

    def run(self, seq_ids: np.ndarray, token_ids: list[int], *, is_view_ok: bool = False) -> torch.Tensor | None:
        """Logits ``[len(seq_ids), vocab]`` of a decode step, rows in ``seq_ids`` order; None (and
        nothing changed) when the rows' slots do not fit a bucket. ``is_view_ok``: no other replay comes
        before these logits are read (the step's only mini-batch), so they may be a view of the graph's
        buffer. Runs on the dense thread."""
        slots = self.node.slots_of(seq_ids)
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if self._is_taken(ahead, seq_ids, slots, token_ids):
                self.node.advance(slots)
                self.num_ahead_taken += 1
                self.num_replays += 1
                return self._rows_of(ahead.bucket, slots, is_view_ok,
                                     is_staged_order=list(ahead.lengths) == seq_ids.tolist())
            self.num_ahead_discarded += 1
        rows = self.rows_for(slots)
        if rows is None:
            self.num_fallbacks += 1
            return None
        lengths = self.node.advance(slots)
        bucket = self._launch(rows, slots, lengths, token_ids)
        self.num_replays += 1
        return self._rows_of(bucket, slots, is_view_ok)

    def launch_ahead(self, seq_ids: np.ndarray, token_ids: torch.Tensor) -> bool:
        """Start the step after the one just run over ``seq_ids``, its inputs the sampled ``token_ids``
        (a device tensor, rows in ``seq_ids`` order) without waiting for them. False (nothing launched)
        when the rows fit no bucket or one would outgrow its slot. Runs on the dense thread."""
        slots = self.node.slots_of(seq_ids)
        rows = self.rows_for(slots)
        lengths = self.node.lengths_of(slots) + 1
        if rows is None or int(lengths.max()) > self.node.config.slot_len:
            return False
        bucket = self._launch(rows, slots, lengths, token_ids)
        self._ahead = _Ahead(bucket, dict(zip(seq_ids.tolist(), lengths.tolist())))
        return True

    def confirm_ahead(self, token_ids: list[int]) -> None:
        """The host's copy of the tokens the step launched ahead was fed."""
        if self._ahead is not None:
            self._ahead.tokens = dict(zip(self._ahead.lengths, token_ids))

    def _is_taken(self, ahead: _Ahead, seq_ids: np.ndarray, slots: np.ndarray, token_ids: list[int]) -> bool:
        """The step launched ahead ran every one of these rows at its next length with its last token."""
        if ahead.tokens is None:
            return False
        next_lengths = self.node.lengths_of(slots) + 1
        return all(ahead.lengths.get(seq_id) == length and ahead.tokens[seq_id] == token
                   for seq_id, length, token in zip(seq_ids.tolist(), next_lengths.tolist(), token_ids))

    def _launch(self, rows: int, slots: np.ndarray, lengths: np.ndarray, token_ids) -> _Bucket:
        """Stage one step's inputs (``token_ids``: host ints, or a device tensor fed on the device) and
        run it: a replay, or the program eagerly when not graphed."""
        staging = padding_inputs(self.node, rows)
        is_on_device = isinstance(token_ids, torch.Tensor)
        if not is_on_device:
            staging[_TOKENS, slots] = token_ids
        staging[_POSITIONS, slots] = lengths - 1
        staging[_COLUMNS, slots] = lengths - 1
        staging[_LENGTHS, slots] = lengths
        staging[_ROW_SLOTS, :len(slots)] = slots
        bucket = self._bucket(rows)
        host = torch.from_numpy(staging)
        bucket.inputs.copy_(host.pin_memory() if self.is_graphed else host, non_blocking=self.is_graphed)
        if is_on_device:
            bucket.inputs[_TOKENS].index_copy_(0, bucket.inputs[_ROW_SLOTS, :len(slots)], token_ids)
        if self.is_graphed:
            bucket.graph.replay()
        else:
            bucket.logits = step_program(self.model, self.node, bucket.inputs)
        return bucket

    def _rows_of(self, bucket: _Bucket, slots: np.ndarray, is_view_ok: bool, *,
                 is_staged_order: bool = True) -> torch.Tensor:
        """Logits of ``slots``' rows, in that order. With ``is_view_ok``, rows ``0..n-1`` in order are a
        view of the bucket's buffer, which the next replay of the bucket writes: what reads them (the
        sampler) is queued before that (a step launched ahead is launched after its sampling). Otherwise
        a copy. ``is_staged_order``: the bucket's last inputs listed exactly these slots in this order."""
        if is_view_ok and np.array_equal(slots, np.arange(len(slots))):
            return bucket.logits[:len(slots)]
        index = (bucket.inputs[_ROW_SLOTS, :len(slots)] if is_staged_order
                 else upload(torch.from_numpy(slots), bucket.inputs.device))
        return bucket.logits.index_select(0, index)

    def profile(self, batches, *, context_len: int = 1, repeats: int = 3) -> list[tuple[int, float]]:
        """(batch, best-of-``repeats`` seconds of one whole step) for each batch that runs as a graph:
        its bucket's program over padding rows (a replay on CUDA; it writes only scratch columns), what
        the scheduler's whole-step model starts from. Captures those buckets. Runs on the dense thread.

        ``context_len``: the length every row attends over (at most the node's ``slot_len``). Attention
        that stops at a row's length (Triton, flex) reads that many columns of each slot, so a step
        timed at the planned mean context pays its KV reading; at 1 it times the dense work alone."""
        if not 1 <= context_len <= self.node.config.slot_len:
            raise ValueError(f"context_len must be in 1..{self.node.config.slot_len}, got {context_len}")
        samples = []
        for batch, rows in self._graph_rows(batches):
            bucket = self._padding_bucket(rows)
            bucket.inputs[_LENGTHS, :batch].fill_(context_len)  # the rest stay padding, as in a real step
            best = float("inf")
            for repeat in range(repeats + 1):  # the first is a warm-up
                if self.is_graphed:
                    torch.cuda.synchronize(self.model.device)
                start = time.perf_counter()
                self._run_once(bucket)
                if repeat:
                    best = min(best, time.perf_counter() - start)
            samples.append((batch, best))
        return samples

    def warm_up(self, batches) -> None:
        """Makes the buckets of ``batches`` (compiles, captures) and runs each once over padding rows, as its
        first mini-batch would (it writes only scratch columns). Runs on the dense thread."""
        for _, rows in self._graph_rows(batches):
            self._run_once(self._padding_bucket(rows))

    def _padding_bucket(self, rows: int) -> _Bucket:
        """The bucket of ``rows`` rows (made if new), its inputs all padding."""
        bucket = self._bucket(rows)
        bucket.inputs.copy_(torch.from_numpy(padding_inputs(self.node, rows)))
        return bucket

    def _run_once(self, bucket: _Bucket) -> None:
        """One step of ``bucket``'s program, done when this returns: its replay on CUDA, else eagerly."""
        if self.is_graphed:
            bucket.graph.replay()
            torch.cuda.synchronize(self.model.device)
        else:
            step_program(self.model, self.node, bucket.inputs)

    def _graph_rows(self, batches) -> list[tuple[int, int]]:
        """(batch, its bucket's rows) for each of ``batches`` that runs as a graph (the eager path runs the
        others)."""
        pairs = [(batch, min(bucket_for(batch), self.node.num_slots)) for batch in sorted(set(batches))]
        return [(batch, rows) for batch, rows in pairs if rows <= self.max_rows]

    def _bucket(self, rows: int) -> _Bucket:
        bucket = self._buckets.get(rows)
        if bucket is None:
            bucket = self._buckets[rows] = _Bucket(self.model, self.node, rows, pool=self._pool)
        return bucket
