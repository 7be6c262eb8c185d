"""The GPU KV node: sequences' KV-cache held next to the weights, batched decode attention.

Memory is a preallocated pool per layer, ``[num_slots, Hkv, columns, D]`` for K and
for V, one slot per sequence (``slot_len`` is the longest sequence the Executor
admits; ``columns`` is ``slot_len`` plus at least one scratch column, rounded up to
16, where the padding rows of a whole-step CUDA graph write). The slots are counted
from those real bytes, so the pool never takes more than ``memory_bytes``
(``gpu_kv_bytes`` gives the bytes of a pool of N slots), and a ``memory_bytes`` past
the device's free memory (CUDA's, or the host's available RAM) is refused before any
allocation (``GpuKVMemoryError``). One attend call writes
every row's new k, v with a single indexed store, then runs torch's fused
``scaled_dot_product_attention`` over the rows' slots, cut to the longest context
among them, with a length mask. GQA needs no expanded KV: a KV head's query heads
become the "query length" of the fused call. When the rows' slots are consecutive
(the usual case: slots are handed out lowest first and rows are sorted) the slots
are a view of the pool; otherwise they are gathered.

To the scheduler it is one more node: NodeStats with one page per slot
(``page_size = slot_len``) and an attend-time model calibrated at start-up from
timed attends at two context lengths, like the KVShard's.

``attend_static`` is the graphable form used by ``cuda_graphs.StepGraphs``: rows are
the slots ``0..rows-1`` themselves (a view of the pool, no gather), the new k, v go
to per-row columns through an index built on the device once per step (written by the
model's dense part, ``kv_rows``, inside its RoPE kernel when compiled), and the
attention (``static_attention.StaticAttention``: the split-KV Triton kernel of
``decode_attention`` where it runs, else SDPA, a compiled matmul form or flex attention)
runs over the slots under a mask made on the device
from per-row lengths, so no shape or host value changes from one step to the next.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastdecode.actors.host_memory import available_memory_bytes
from fastdecode.actors.kv_nodes import KVNode, NodeStats
from fastdecode.actors.static_attention import STATIC_ATTENTIONS, StaticAttention


class GpuKVMemoryError(ValueError):
    """The GPU KV memory asked for is more than the device has free: refused before allocating."""


@dataclass(frozen=True)
class GpuKVConfig:
    memory_bytes: int  # for the whole pool, K and V of every layer
    slot_len: int  # tokens per sequence at most
    is_calibrating: bool = True
    static_attention: str = "auto"  # attend_static's kernel, one of static_attention.STATIC_ATTENTIONS
    compile_backend: str = "inductor"  # torch.compile's, for the compiled static attentions

    def __post_init__(self) -> None:
        if self.static_attention not in STATIC_ATTENTIONS:
            raise ValueError(f"static_attention must be one of {STATIC_ATTENTIONS}, got {self.static_attention!r}")
        if self.memory_bytes < 1:
            raise ValueError("GPU KV memory must be positive")
        if self.slot_len < 2:
            raise ValueError("slot_len must be at least 2 tokens")


@dataclass(frozen=True)
class _Rows:
    """One mini-batch's rows as the pool sees them, for one step."""

    slot_index: torch.Tensor  # [B] slots, on the device
    positions: torch.Tensor  # [B] where the new token goes (length - 1)
    mask: torch.Tensor  # [B, 1, 1, max_len] True where a key is held
    max_len: int
    first_slot: int | None  # the rows' slots are first_slot, first_slot + 1, ...; None: scattered


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def slot_columns(slot_len: int) -> int:
    """Token columns a slot of ``slot_len`` tokens takes: one scratch column more, rounded up to 16."""
    return _round_up(slot_len + 1, 16)


def gpu_kv_bytes(model, num_slots: int, slot_len: int) -> int:
    """The ``memory_bytes`` of a pool of exactly ``num_slots`` slots of ``slot_len`` tokens for ``model``."""
    return num_slots * slot_columns(slot_len) * model.config.kv_bytes_per_token(model.dtype.itemsize)


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, or on the CPU the RAM available now
    (``host_memory.available_memory_bytes``: MemAvailable, within the container's limit)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_memory_bytes()


def check_gpu_kv_memory(memory_bytes: int, device: torch.device) -> None:
    """GpuKVMemoryError when a pool of ``memory_bytes`` cannot fit the memory ``device`` has free."""
    free = free_memory_bytes(torch.device(device))
    if memory_bytes > free:
        where = "this GPU has" if torch.device(device).type == "cuda" else "this host has available"
        raise GpuKVMemoryError(f"GPU KV memory of {_in_mib_or_gib(memory_bytes)} is more than {where} "
                               f"({_in_mib_or_gib(free)})")


def _in_mib_or_gib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 30):.2f} GiB" if num_bytes >= 1 << 30 else f"{num_bytes / (1 << 20):.1f} MiB"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuKVNode(KVNode):
    """KV-cache in a torch pool on the Executor's device (CUDA, or the CPU in tests)."""

    is_host = False
    can_attend_now = True

    def __init__(self, node_id: str, config: GpuKVConfig, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.node_id = node_id
        self.config = config
        self.device = torch.device(device)
        self.num_layers = num_layers
        self.bytes_per_token_layer = 2 * num_kv_heads * head_dim * dtype.itemsize
        self.num_columns = slot_columns(config.slot_len)
        slot_bytes = self.num_columns * self.bytes_per_token_layer * num_layers  # what a slot really takes
        self.num_slots = config.memory_bytes // slot_bytes
        if self.num_slots < 1:
            raise ValueError(f"GPU KV memory of {config.memory_bytes} bytes holds no sequence of {config.slot_len} "
                             f"tokens ({slot_bytes} bytes each, with the scratch and padding columns)")
        check_gpu_kv_memory(config.memory_bytes, self.device)
        self.scratch_column = self.num_columns - 1  # never read unmasked: lengths stop at slot_len
        shape = (num_layers, 2, self.num_slots, num_kv_heads, self.num_columns, head_dim)
        self._pool = torch.zeros(shape, dtype=dtype, device=self.device)
        self._lengths = np.zeros(self.num_slots, dtype=np.int64)  # tokens held, per slot (all layers alike)
        self._slot_of: dict[int, int] = {}
        self._free_slots = list(range(self.num_slots - 1, -1, -1))  # pop() hands out the lowest first
        self._arange = torch.arange(self.num_columns, device=self.device)
        self._scale = 1.0 / math.sqrt(head_dim)
        self._rows: dict[bytes, _Rows] = {}  # this step's mini-batches, by their seq_ids
        self.attn_gbps: float | None = None
        self.attend_overhead_s: float | None = None
        self.static_attention = StaticAttention(config.static_attention, num_slots=self.num_slots,
                                                num_columns=self.num_columns, head_dim=head_dim, scale=self._scale,
                                                dtype=dtype, device=self.device,
                                                compile_backend=config.compile_backend)

    @classmethod
    def for_model(cls, node_id: str, model, config: GpuKVConfig) -> "GpuKVNode":
        cfg = model.config
        node = cls(node_id, config, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   dtype=model.dtype, device=model.device)
        if config.is_calibrating:
            node.calibrate()
        return node

    # ---- KVNode verbs -------------------------------------------------------------------------
    async def allocate(self, seq_ids: list[int]) -> None:
        if len(seq_ids) > len(self._free_slots):
            raise MemoryError(f"GPU KV node has {len(self._free_slots)} free slots, asked for {len(seq_ids)}")
        if any(s in self._slot_of for s in seq_ids) or len(set(seq_ids)) != len(seq_ids):
            raise KeyError(f"sequence already allocated among {seq_ids}")
        for seq_id in seq_ids:
            slot = self._free_slots.pop()
            self._slot_of[seq_id] = slot
            self._lengths[slot] = 0

    async def free(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            slot = self._slot_of.pop(seq_id, None)
            if slot is None:
                raise KeyError(f"sequence {seq_id} is not allocated")
            self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)
        self._rows.clear()

    async def append_prompt(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self._slot(seq_id)
        start, num_new = int(self._lengths[slot]), k.shape[1]
        if start + num_new > self.config.slot_len:
            raise ValueError(f"sequence {seq_id} would hold {start + num_new} tokens; slots hold "
                             f"{self.config.slot_len}")
        pool = self._pool[:, :, slot, :, start:start + num_new]  # [L, 2, Hkv, T, D]
        pool[:, 0].copy_(k.transpose(1, 2))
        pool[:, 1].copy_(v.transpose(1, 2))
        self._lengths[slot] = start + num_new

    async def attend(self, layer, seq_ids, q, k, v):
        return self.attend_now(layer, seq_ids, q, k, v)

    def attend_now(self, layer, seq_ids, q, k, v):
        key = np.asarray(seq_ids, dtype=np.int64).tobytes()
        rows = self._rows.get(key) if layer > 0 else None
        if rows is None:  # a new step (layer 0): the rows' lengths grow by the new token
            slots = self.slots_of(seq_ids)
            if layer == 0:
                self.advance(slots)
            rows = self._make_rows(slots)
            if len(self._rows) >= 8:
                self._rows.clear()
            self._rows[key] = rows
        with torch.inference_mode():
            return self.attend_rows(layer, rows, q, k, v)

    def slots_of(self, seq_ids) -> np.ndarray:
        """The slots of allocated sequences, in the given order."""
        return np.fromiter((self._slot(int(s)) for s in seq_ids), dtype=np.int64, count=len(seq_ids))

    def lengths_of(self, slots: np.ndarray) -> np.ndarray:
        """Tokens held by ``slots`` now (a copy)."""
        return self._lengths[slots].copy()

    def advance(self, slots: np.ndarray) -> np.ndarray:
        """A new decode step for ``slots``: each holds one more token. Their new lengths."""
        if np.any(self._lengths[slots] >= self.config.slot_len):
            raise ValueError(f"a sequence outgrew its slot of {self.config.slot_len} tokens")
        self._lengths[slots] += 1
        return self._lengths[slots].copy()

    async def stats(self) -> NodeStats:
        used = int(self._lengths[list(self._slot_of.values())].sum()) * self.bytes_per_token_layer * self.num_layers
        return NodeStats(self.config.memory_bytes, used, self.config.slot_len, self.num_slots * self.num_layers,
                         len(self._slot_of), self.attn_gbps, self.attend_overhead_s)

    async def close(self) -> None:
        self._pool = self._pool.new_empty(0)

    # ---- attention ----------------------------------------------------------------------------
    def _make_rows(self, slots: np.ndarray) -> _Rows:
        """Device-side indices and mask for attends over ``slots`` at their current lengths,
        made once per step and reused by every layer."""
        lengths = self._lengths[slots]
        max_len = int(lengths.max())
        is_run = bool(np.all(np.diff(slots) == 1))
        slot_index = torch.from_numpy(slots).to(self.device)
        length_t = torch.from_numpy(lengths).to(self.device)
        mask = (self._arange[:max_len] < length_t[:, None]).view(len(slots), 1, 1, max_len)
        return _Rows(slot_index, length_t - 1, mask, max_len, int(slots[0]) if is_run else None)

    def attend_rows(self, layer: int, rows: _Rows, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
        """Store row i's k, v at ``rows.positions[i]`` of its slot, attend q over the slot up to
        and with it. q[B,Hq,D], k/v[B,Hkv,D] -> o[B,Hq,D]."""
        num_rows, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        pool = self._pool[layer]  # [2, S, Hkv, slot_len, D]
        pool[:, rows.slot_index, :, rows.positions] = torch.stack((k, v), dim=1)  # [B, 2, Hkv, D]
        if rows.first_slot is not None:
            start = rows.first_slot
            keys = pool[0, start:start + num_rows, :, :rows.max_len]
            values = pool[1, start:start + num_rows, :, :rows.max_len]
        else:
            # cut to the rows' longest context before the gather, which copies what it selects: cut after it, each
            # row copied its whole slot (every column up to max_model_len)
            keys = pool[0, :, :, :rows.max_len].index_select(0, rows.slot_index)
            values = pool[1, :, :, :rows.max_len].index_select(0, rows.slot_index)
        query = q.view(num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=rows.mask, scale=self._scale)
        return o.reshape(num_rows, num_heads, head_dim)

    def static_mask(self, lengths: torch.Tensor):
        """The mask every layer of a whole step attends under (``StaticAttention.mask``), built on the
        device once per step from the rows' lengths."""
        return self.static_attention.mask(lengths)

    def static_write_index(self, columns: torch.Tensor) -> torch.Tensor:
        """``[2 * rows * Hkv]`` rows of ``kv_rows(layer)`` where row r's new k and v go (column ``columns[r]``
        of slot r, every KV head): the order of a ``kv[2, rows, Hkv, D]``. Built on the device once per
        step; every layer writes through it."""
        num_rows, (_, num_slots, num_kv_heads, num_columns, _) = columns.shape[0], self._pool.shape[1:]
        kind = torch.arange(2, device=self.device).view(2, 1, 1)
        slot = torch.arange(num_rows, device=self.device).view(1, num_rows, 1)
        head = torch.arange(num_kv_heads, device=self.device).view(1, 1, num_kv_heads)
        return (((kind * num_slots + slot) * num_kv_heads + head) * num_columns + columns.view(1, num_rows, 1)).view(-1)

    def kv_rows(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s pool, K and V of every slot, head and column, as ``[rows, D]`` (a view): what
        the whole-step program's dense parts write the new k, v into (``LlamaModel.step_first``)."""
        return self._pool[layer].view(-1, self._pool.shape[-1])

    def attend_static(self, layer: int, mask, q: torch.Tensor) -> torch.Tensor:
        """Graphable attend for rows that ARE slots ``0..rows-1``, their new k, v already in the pool
        (written through ``kv_rows``): attend over all columns under ``mask`` (``static_mask``'s).
        q[rows,Hq,D] -> o."""
        num_rows, num_heads, head_dim = q.shape
        num_kv_heads = self._pool.shape[3]
        pool = self._pool[layer, :, :num_rows]  # [2, rows, Hkv, columns, D], a view
        query = q.view(num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
        return self.static_attention(query, pool[0], pool[1], mask).reshape(num_rows, num_heads, head_dim)

    def calibrate(self, *, repeats: int = 3) -> None:
        """Time attends over a batch of slots at two context lengths; fit overhead + bytes/s."""
        num_rows = min(self.num_slots, 16)
        slots = np.arange(num_rows, dtype=np.int64)
        num_kv_heads, head_dim = self._pool.shape[3], self._pool.shape[5]
        q = torch.zeros(num_rows, num_kv_heads, head_dim, dtype=self._pool.dtype, device=self.device)
        samples = []
        saved = self._lengths[slots].copy()
        for context in sorted({max(2, self.config.slot_len // 8), self.config.slot_len}):
            self._lengths[slots] = context
            rows = self._make_rows(slots)
            best = float("inf")
            with torch.inference_mode():
                self.attend_rows(0, rows, q, q, q)  # warm-up
                for _ in range(repeats):
                    _synchronize(self.device)
                    t0 = time.perf_counter()
                    self.attend_rows(0, rows, q, q, q)
                    _synchronize(self.device)
                    best = min(best, time.perf_counter() - t0)
            samples.append((num_rows * context * self.bytes_per_token_layer, best))
        self._lengths[slots] = saved
        self._pool.zero_()
        (b0, t0), (b1, t1) = samples[0], samples[-1]
        # too fast to tell the two lengths apart (overhead-bound): count all of the long call as reading
        seconds_per_byte = (t1 - t0) / (b1 - b0) if b1 > b0 and t1 > t0 else t1 / b1
        self.attn_gbps = 1e-9 / seconds_per_byte
        self.attend_overhead_s = max(t0 - b0 * seconds_per_byte, 0.0)

    def _slot(self, seq_id: int) -> int:
        try:
            return self._slot_of[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id} is not allocated") from None
