"""Prefill on the Executor's device: causal attention over a prompt, keeping its K/V.

The K/V of every layer come back stacked ``[num_layers, T, Hkv, D]`` so they can
go to the owning KV node in one message.
"""
from __future__ import annotations

import torch

from fastdecode.actors.model import prefill_attention


def prefill(model, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of the last position ``[1, vocab]``, keys, values) for one prompt."""
    positions = torch.arange(token_ids.shape[0], dtype=torch.long, device=token_ids.device)
    x = model.embed(token_ids)
    keys, values = [], []
    for layer in range(model.num_layers):
        q, k, v = model.pre_attention(layer, x, positions)
        keys.append(k)
        values.append(v)
        x = model.post_attention(layer, x, prefill_attention(q, k, v))
    return model.logits(x[-1:]), torch.stack(keys), torch.stack(values)

