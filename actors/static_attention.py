"""The graphable attention of the GPU KV node's whole-step program (``GpuKVNode.attend_static``).

Rows are the pool's slots ``0..rows-1``; the query is ``[rows, Hkv, G, D]`` (a KV head's G query heads
together), keys and values are the slots' whole ``[rows, Hkv, C, D]``, and which columns count comes from
the rows' lengths, a device tensor: nothing depends on a host value, so a CUDA graph can hold it. Kinds:

- ``"sdpa"``: torch's fused ``scaled_dot_product_attention`` under an additive ``[rows, 1, 1, C]`` mask.
- ``"matmul"``: two batched matmuls with a float32 masked softmax between them; ``"compiled"``: the same
  through ``torch.compile``, which fuses the scale, mask and softmax into one kernel.
- ``"flex"``: torch's ``flex_attention`` (compiled; at one query per head it runs its decoding kernel,
  which splits each row's KV across thread blocks). The lengths make its block mask: blocks past a row's
  length are not read, and the last, partial one is masked by ``kv_idx < length``.
- ``"triton"``: ``decode_attention``'s split-KV kernels (fp16/bf16 on CUDA with Triton): each (row, KV
  head, split) reads its columns below the row's length once for all its query heads; the splits of a
  row are merged by a second kernel.
- ``"auto"``: ``"triton"`` where it runs (CUDA with Triton, fp16/bf16, a power-of-two head dim); else on
  CUDA ``"compiled"`` up to ``AUTO_COMPILED_MAX_ROWS`` rows and ``"flex"`` above; ``"sdpa"`` elsewhere.

On the H100 (Llama-3-8B shapes, lengths 512 of 560 columns, 32 layers in one CUDA graph), µs per layer
(docs/benchmarks.md, session 5), the former ``auto`` (compiled up to 2 rows, flex above) against the best
cut of ``"triton"``: 1 row 10.4 / 7.0, 4 rows 13.9 / 9.1, 16 rows 19.0 / 17.8, 32 rows 29.1 / 26.5, 64 rows
50.8 / 47.5 (2.8 TB/s), 64 ragged rows (log-normal around 300) 44.7 / 35.1. SDPA took 19.0 µs at 1 row and
66.8 at 64 (session 4).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fastdecode.actors import decode_attention
from fastdecode.actors.model.llama import has_triton

log = logging.getLogger(__name__)

STATIC_ATTENTIONS = ("sdpa", "matmul", "compiled", "flex", "triton", "auto")
AUTO_COMPILED_MAX_ROWS = 2
FLEX_KV_BLOCK = 64  # columns per block of flex's block mask
MAX_FLEX_SHAPES = 64  # batch sizes flex is compiled for, at most (buckets are powers of two: a handful)


def masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``query[rows, Hkv, G, D]`` over ``keys/values[rows, Hkv, C, D]`` under the additive ``mask``
    ``[rows, 1, 1, C]``; the softmax in float32."""
    scores = torch.matmul(query, keys.transpose(-1, -2)).float() * scale
    probs = (scores + mask).softmax(dim=-1).to(query.dtype)
    return torch.matmul(probs, values)


class StaticAttention:
    """One GPU KV node's graphable attention: ``mask(lengths)`` once per step, then a call per layer."""

    def __init__(self, kind: str, *, num_slots: int, num_columns: int, head_dim: int, scale: float,
                 dtype: torch.dtype, device: torch.device, compile_backend: str = "inductor") -> None:
        if kind not in STATIC_ATTENTIONS:
            raise ValueError(f"static_attention must be one of {STATIC_ATTENTIONS}, got {kind!r}")
        self.kind = kind
        self.num_columns = num_columns
        self.scale = scale
        self.dtype = dtype
        self.device = device
        self._arange = torch.arange(num_columns, device=device)
        self._matmul = masked_attention
        self._flex = None
        is_cuda = device.type == "cuda"
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if is_cuda else None
        is_triton_ready = is_cuda and has_triton() and decode_attention.runs(dtype, head_dim)
        if kind == "triton" and not is_triton_ready:
            raise ValueError(f"static_attention 'triton' needs a CUDA device with Triton, float16 or bfloat16 "
                             f"and a power-of-two head dim of at least 16 (here {device.type}, {dtype}, {head_dim})")
        if kind == "auto" and is_triton_ready:
            kind = self.kind = "triton"
        wants_compiled = kind in ("compiled", "flex") or (kind == "auto" and is_cuda)
        can_compile = not (compile_backend == "inductor" and is_cuda and not has_triton())
        if wants_compiled and not can_compile:
            log.warning("torch.compile needs Triton, which is not installed: the attention runs eagerly")
            self.kind = "sdpa" if kind == "auto" else kind
        elif wants_compiled:
            from torch.nn.attention.flex_attention import flex_attention

            self._matmul = torch.compile(masked_attention, dynamic=True, fullgraph=True, backend=compile_backend)
            # flex compiled for each batch size as it comes (a bucket's shape never changes): compiled for a
            # dynamic batch, its kernel took 337 µs per layer at 64 rows on the H100 against 57.5 static
            self._flex = torch.compile(flex_attention, dynamic=False, fullgraph=True, backend=compile_backend)
        if self.kind == "auto" and not is_cuda:
            self.kind = "sdpa"
        if self.kind in ("flex", "auto"):  # what flex's block mask needs
            # flex's mask reads the rows' lengths from this buffer (one function for every step and bucket)
            self._lengths = torch.zeros(num_slots, dtype=torch.int64, device=device)
            num_blocks = -(-num_columns // FLEX_KV_BLOCK)
            # every row's blocks in order, materialised (an expanded, stride-0 table crashed flex's kernel on the
            # H100)
            self._block_indices = torch.arange(num_blocks, dtype=torch.int32, device=device).repeat(num_slots, 1)
            held = self._lengths

            def is_held(b, h, q_idx, kv_idx):  # made once: a new function each step would mean a new compile
                return kv_idx < held[b]

            self._is_held = is_held

    def kind_for(self, num_rows: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "compiled" if num_rows <= AUTO_COMPILED_MAX_ROWS else "flex"

    def mask(self, lengths: torch.Tensor):
        """What every layer of a step over ``lengths.shape[0]`` rows attends under: for flex its block
        mask, for triton the lengths themselves, else the ``[rows, 1, 1, C]`` additive mask in the pool's
        dtype, 0 where column < the row's length and -inf past it (a boolean one would be turned into this
        inside every layer's call)."""
        num_rows = lengths.shape[0]
        kind = self.kind_for(num_rows)
        if kind == "flex":
            return self._block_mask(lengths)
        if kind == "triton":
            return lengths
        bias = torch.zeros((), dtype=self.dtype, device=self.device).masked_fill(
            self._arange >= lengths[:, None], float("-inf"))
        return bias.view(num_rows, 1, 1, self.num_columns)

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
        """``[rows, Hkv, G, D]`` outputs of ``query`` over ``keys/values[rows, Hkv, C, D]``."""
        kind = self.kind_for(query.shape[0])
        if kind == "sdpa":
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scale)
        if kind == "triton":
            return decode_attention.decode_attention(query, keys, values, mask, self.scale, num_sms=self._num_sms)
        if kind == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            rows, num_kv_heads, group, head_dim = query.shape
            run = self._flex or flex_attention
            with torch._dynamo.config.patch(recompile_limit=MAX_FLEX_SHAPES):  # one compile per bucket
                o = run(query.reshape(rows, num_kv_heads * group, 1, head_dim), keys, values, block_mask=mask,
                        scale=self.scale, enable_gqa=True, kernel_options=self._flex_options(rows * num_kv_heads))
            return o.view(rows, num_kv_heads, group, head_dim)
        return self._matmul(query, keys, values, mask, self.scale)

    def _flex_options(self, num_programs: int) -> dict | None:
        """flex decoding's options for ``num_programs`` (rows × KV heads) thread blocks before any split of
        the KV: split each in two when they make between one and two waves over the multiprocessors (a
        second, partial wave otherwise leaves most of them idle). On the H100 (132 SMs), per layer at 32
        rows: 32.2 µs split in two against 36.4 unsplit; at 4, 16 and 64 rows its own choice was best."""
        if self._num_sms is None or not self._num_sms < num_programs <= 2 * self._num_sms:
            return None
        return {"SPLIT_KV": 2}

    def _block_mask(self, lengths: torch.Tensor):
        from torch.nn.attention.flex_attention import BlockMask

        num_rows = lengths.shape[0]
        self._lengths[:num_rows].copy_(lengths)
        num_blocks = ((lengths + FLEX_KV_BLOCK - 1) // FLEX_KV_BLOCK).to(torch.int32).view(num_rows, 1, 1)
        indices = self._block_indices[:num_rows].reshape(num_rows, 1, 1, -1)
        return BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=(128, FLEX_KV_BLOCK), mask_mod=self._is_held,
                                        seq_lengths=(1, self.num_columns), compute_q_blocks=False)
