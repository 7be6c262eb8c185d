"""Prefill on the Executor's device: causal attention over a prompt, keeping its K/V.

The K/V of every layer come back stacked ``[num_layers, T, Hkv, D]`` so they can
go to the owning KV node in one message.
"""
from __future__ import annotations

import time

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


def time_prefill(model, prompt_len: int) -> float:
    """Seconds of one prefill forward pass over ``prompt_len`` tokens, timed after an untimed one
    (which also compiles that shape)."""
    tokens = torch.zeros(prompt_len, dtype=torch.long, device=model.device)
    is_cuda = model.device.type == "cuda"
    with torch.inference_mode():
        prefill(model, tokens)
        if is_cuda:
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        prefill(model, tokens)
        if is_cuda:
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - start
