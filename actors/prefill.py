"""Prefill on the Executor's device: causal attention over a prompt, keeping its K/V.

The K/V of every layer come back stacked ``[num_layers, T, Hkv, D]`` so they can
go to the owning KV node in one message. A prompt may also be prefilled a chunk
at a time (``prefill_chunk``), each chunk attending over the K/V of the chunks
before it (chunked prefill: ``fastdecode.actors.chunked_prefill``).
"""
from __future__ import annotations

import torch

from fastdecode.actors.model import prefill_attention
from fastdecode.actors.model.attention import prefill_attention_with_prefix


def prefill(model, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of the last position ``[1, vocab]``, keys, values) for one prompt."""
    return prefill_chunk(model, token_ids, 0, None, None)


def prefill_chunk(model, token_ids: torch.Tensor, start: int, past_k: torch.Tensor | None,
                  past_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of the chunk's last position ``[1, vocab]``, the chunk's keys, values ``[num_layers, T, Hkv, D]``)
    for the prompt tokens ``token_ids`` at positions ``start``.., after the earlier positions' K/V ``past_k``,
    ``past_v`` ``[num_layers, start, Hkv, D]`` (None when ``start`` is 0)."""
    num_past = 0 if past_k is None else past_k.shape[1]
    if (past_k is None) != (past_v is None) or num_past != start:
        raise ValueError(f"a chunk at position {start} needs the K/V of the {start} positions before it, "
                         f"got {None if past_k is None else tuple(past_k.shape)}")
    positions = torch.arange(start, start + token_ids.shape[0], dtype=torch.long, device=token_ids.device)
    x = model.embed(token_ids)
    keys, values = [], []
    for layer in range(model.num_layers):
        q, k, v = model.pre_attention(layer, x, positions)
        keys.append(k)
        values.append(v)
        o = (prefill_attention(q, k, v) if past_k is None
             else prefill_attention_with_prefix(q, k, v, past_k[layer], past_v[layer]))
        x = model.post_attention(layer, x, o)
    return model.logits(x[-1:]), torch.stack(keys), torch.stack(values)
