"""The attention part in plain torch: causal prefill and a per-sequence KV cache.

Used by tests and single-process runs; the KVShard's native library does the
same job on CPU hosts and is checked against this.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def _expand_kv(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[T, Hkv, D] -> [Hq, T, D], query head h reading KV head h // (Hq/Hkv)."""
    group = num_heads // kv.shape[1]
    return kv.transpose(0, 1).repeat_interleave(group, dim=0)


def _as_rows(o: torch.Tensor) -> torch.Tensor:
    """``o[T,Hq,D]`` in the standard contiguous layout, strides included where T is 1 (which ``contiguous()``
    leaves as they were): the layout of a decode step's attention output, so that the compiled post-attention
    segment serves prompts and decode steps with the same graphs (a transposed o compiled its own at start-up)."""
    return o.clone(memory_format=torch.contiguous_format)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of one prompt: q[T,Hq,D], k/v[T,Hkv,D] -> o[T,Hq,D]. Each KV head is read for
    its group of query heads as it is (no copy per query head)."""
    return _attend(q, k, v, is_causal=True)


def prefill_attention_after(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Causal attention of a prompt's chunk, the last ``T`` of ``S`` positions: q[T,Hq,D] over keys/values
    [S,Hkv,D] (the ``S - T`` earlier positions, then the chunk's own), query i (position S-T+i) seeing keys
    0..S-T+i. keys/values may be views of a larger buffer: nothing is copied or expanded per query head, and no
    [T, S] mask is made (torch's lower-right causal bias, which the fused kernels run as such)."""
    if keys.shape != values.shape or keys.dim() != 3 or keys.shape[1:] != (keys.shape[1], q.shape[2]) \
            or keys.shape[0] < q.shape[0]:
        raise ValueError(f"keys and values must both be [S >= {q.shape[0]}, Hkv, {q.shape[2]}], got "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}")
    num_new, num_all = q.shape[0], keys.shape[0]
    if num_new == num_all:
        return prefill_attention(q, keys, values)
    return _attend(q, keys, values, mask=causal_lower_right(num_new, num_all))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
            mask=None) -> torch.Tensor:
    # batched [1, tokens, heads, D]: the fused (flash, memory-efficient) kernels take four dimensions; given three,
    # SDPA falls back to the math one, which makes the [Hq, T, S] scores (32 GB for a 2k chunk after 120k tokens)
    return _attend_batch(q[None], k[None], v[None], is_causal=is_causal, mask=mask)[0]


def _attend_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                  mask=None) -> torch.Tensor:
    """SDPA over ``[B, T, Hq, D]`` queries and ``[B, S, Hkv, D]`` keys/values -> ``[B, T, Hq, D]`` rows."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads do not share {k.shape[2]} KV heads evenly")
    is_gqa = q.shape[2] != k.shape[2]
    if is_gqa and not _is_flash_gpu(q):
        # on CUDA only flash takes GQA; elsewhere there (fp32, pre-Ampere GPUs) SDPA would take the math kernel and
        # its [Hq, T, S] float32 scores: K/V expanded per query head let the memory-efficient kernel run instead
        k, v, is_gqa = *_per_query_head(q, k, v), False
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=is_causal, enable_gqa=is_gqa)
    return _as_rows(o.transpose(1, 2))


def _per_query_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V repeated for each query head of their group (the heads axis is the second last in every layout here)."""
    group = q.shape[-2] // k.shape[-2]
    return k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)


def _is_flash_gpu(q: torch.Tensor) -> bool:
    """Not a CUDA tensor that flash attention cannot take (``_flash_takes``). The CPU's kernels take GQA as they
    are."""
    return q.device.type != "cuda" or _flash_takes(q.device, q.dtype, q.shape[-1])


def _flash_takes(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Flash attention takes this on a CUDA device: fp16/bf16, head dim at most 256, an Ampere or later GPU."""
    return (dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and torch.cuda.get_device_capability(device) >= (8, 0))


@dataclass(frozen=True)
class RaggedPrompts:
    """Whole prompts laid end to end, as every layer of their shared forward pass attends over them, made once per
    pass (not per layer): their lengths and where each ends, whether they are all of one length (one SDPA batch),
    else the varlen kernel's cumulative bounds on the device (None: one SDPA call per prompt)."""

    seq_lens: tuple[int, ...]
    ends: tuple[int, ...]  # where each prompt ends in the flat layout (the last: the number of tokens)
    bounds: torch.Tensor | None  # int32 [P + 1] on the device, for flash's varlen kernel
    is_uniform: bool

    @classmethod
    def of(cls, seq_lens: Sequence[int], device: torch.device | str, dtype: torch.dtype,
           head_dim: int) -> "RaggedPrompts":
        """ValueError unless each length is at least one token."""
        lengths = tuple(seq_lens)
        if min(lengths, default=1) < 1:
            raise ValueError(f"prompt lengths {list(lengths)} are not all whole prompts of at least one token")
        ends = tuple(itertools.accumulate(lengths))
        is_uniform = len(set(lengths)) <= 1
        bounds = None
        if not is_uniform and _can_run_varlen(torch.device(device), dtype, head_dim):
            bounds = torch.tensor((0, *ends), dtype=torch.int32).to(device, non_blocking=True)
        return cls(lengths, ends, bounds, is_uniform)

    @property
    def num_tokens(self) -> int:
        return self.ends[-1] if self.ends else 0


def prefill_attention_ragged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             prompts: RaggedPrompts) -> torch.Tensor:
    """Causal attention for several prompts laid end to end (flat layout), each on its own: q[N,Hq,D],
    k/v[N,Hkv,D] with N the prompts' ``num_tokens`` -> o[N,Hq,D]. Prompts of one length go through SDPA as one
    batch; others through flash attention's varlen kernel on a GPU that has it, else one SDPA call per prompt."""
    if prompts.num_tokens != q.shape[0]:
        raise ValueError(f"seq_lens sum to {prompts.num_tokens} but there are {q.shape[0]} tokens")
    seq_lens = prompts.seq_lens
    if not seq_lens:
        return q.new_empty(q.shape)
    if prompts.is_uniform:
        num, length = len(seq_lens), seq_lens[0]
        o = _attend_batch(q.view(num, length, *q.shape[1:]), k.view(num, length, *k.shape[1:]),
                          v.view(num, length, *v.shape[1:]), is_causal=True)
        return o.view(q.shape)
    if prompts.bounds is not None:
        return _attend_varlen(q, k, v, prompts.bounds, max(seq_lens))
    return torch.cat([prefill_attention(qs, ks, vs)
                      for qs, ks, vs in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens))])


@functools.cache
def _varlen_causal():
    """torch's varlen flash attention with its causal mask and GQA flags bound, None where this torch lacks it.
    Its causal flag changed after 2.10 (``is_causal`` to a window of ``(-1, 0)``); GQA came later."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        causal = functools.partial(varlen_attn, window_size=(-1, 0))
    elif "is_causal" in parameters:
        causal = functools.partial(varlen_attn, is_causal=True)
    else:
        return None
    return causal, "enable_gqa" in parameters


def _can_run_varlen(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Flash attention's varlen kernel takes queries of this device, dtype and head size: CUDA only (it has no CPU
    kernel), what flash takes there (``_flash_takes``), a torch build that flash attention runs on, and a torch that
    has the call."""
    return (device.type == "cuda" and _flash_takes(device, dtype, head_dim)
            and torch.backends.cuda.is_flash_attention_available() and _varlen_causal() is not None)


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                   longest: int) -> torch.Tensor:
    causal, has_gqa = _varlen_causal()
    if q.shape[1] != k.shape[1] and not has_gqa:
        k, v = _per_query_head(q, k, v)
    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return _as_rows(causal(q, k, v, bounds, bounds, longest, longest, **extra))


class _SequenceCache:
    """One sequence's K and V for every layer, in buffers that double when full."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_tokens = [0] * num_layers
        shape = (16, num_kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start = self.num_tokens[layer]
        end = start + k.shape[0]
        if end > self.keys[layer].shape[0]:
            capacity = max(end, 2 * self.keys[layer].shape[0])
            for store in (self.keys, self.values):
                grown = store[layer].new_empty((capacity, *store[layer].shape[1:]))
                grown[:start] = store[layer][:start]
                store[layer] = grown
        self.keys[layer][start:end] = k
        self.values[layer][start:end] = v
        self.num_tokens[layer] = end


class TorchKVCache:
    """Per-sequence KV cache with the KVShard's verbs: allocate, free, append, attend."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self._sequences: dict[int, _SequenceCache] = {}

    @classmethod
    def for_model(cls, model: "torch.nn.Module") -> "TorchKVCache":
        config = model.config
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, dtype=model.dtype, device=model.device)

    def allocate(self, seq_id: int) -> None:
        if seq_id in self._sequences:
            raise KeyError(f"sequence {seq_id} is already allocated")
        self._sequences[seq_id] = _SequenceCache(
            self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )

    def free(self, seq_id: int) -> None:
        if self._sequences.pop(seq_id, None) is None:
            raise KeyError(f"sequence {seq_id} is not allocated")

    def num_tokens(self, seq_id: int, layer: int = 0) -> int:
        return self._sequence(seq_id).num_tokens[layer]

    @property
    def seq_ids(self) -> list[int]:
        return list(self._sequences)

    def append(self, seq_id: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add k, v [T, Hkv, D] at the end of the sequence's cache for ``layer``."""
        expected = (self.num_kv_heads, self.head_dim)
        if k.dim() != 3 or tuple(k.shape[1:]) != expected or k.shape != v.shape:
            raise ValueError(f"k and v must both be [T, {expected[0]}, {expected[1]}], got {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
        self._sequence(seq_id).append(layer, k, v)

    def attend(self, layer: int, seq_ids: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: append its k, v, then attend q over the whole cache.

        q[B,Hq,D], k/v[B,Hkv,D] -> o[B,Hq,D]; row i belongs to ``seq_ids[i]``.
        """
        if not (q.shape[0] == k.shape[0] == v.shape[0] == len(seq_ids)):
            raise ValueError(f"q, k, v and seq_ids must have the same length, got {q.shape[0]}, {k.shape[0]}, "
                             f"{v.shape[0]}, {len(seq_ids)}")
        num_heads = q.shape[1]
        scale = 1.0 / math.sqrt(self.head_dim)
        out = torch.empty_like(q)
        for row, seq_id in enumerate(seq_ids):
            cache = self._sequence(seq_id)
            cache.append(layer, k[row:row + 1], v[row:row + 1])
            length = cache.num_tokens[layer]
            keys = _expand_kv(cache.keys[layer][:length], num_heads)  # [Hq, L, D]
            values = _expand_kv(cache.values[layer][:length], num_heads)
            scores = torch.matmul(keys.float(), q[row].float().unsqueeze(-1)).squeeze(-1) * scale  # [Hq, L]
            weights = torch.softmax(scores, dim=-1)
            out[row] = torch.matmul(weights.unsqueeze(1), values.float()).squeeze(1).to(q.dtype)
        return out

    def _sequence(self, seq_id: int) -> _SequenceCache:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id} is not allocated") from None
