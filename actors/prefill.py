"""Prefill on the Executor's device: causal attention over a prompt, keeping its K/V.

The K/V of every layer come back stacked ``[num_layers, T, Hkv, D]`` so they can
go to the owning KV node in one message. A prompt may also be prefilled a chunk
at a time (``prefill_chunk``), each chunk attending over the K/V of the chunks
before it (chunked prefill: ``fastdecode.actors.chunked_prefill``). A request that asks for
``prompt_logprobs`` also gets the logprob of each prompt token from the positions before it
(``prompt_token_logprobs``), computed a slice of positions at a time so that no ``[T, vocab]`` tensor is kept.
"""
from __future__ import annotations

import torch

from fastdecode.actors.model import prefill_attention
from fastdecode.actors.model.attention import prefill_attention_with_prefix
from fastdecode.actors.request import PromptLogprob

PROMPT_LOGPROB_ROWS = 256  # positions whose logits are made at once: 256 x a 150k vocabulary is 150 MB of float32


def prefill(model, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of the last position ``[1, vocab]``, keys, values) for one prompt."""
    return prefill_chunk(model, token_ids, 0, None, None)


def prefill_chunk(model, token_ids: torch.Tensor, start: int, past_k: torch.Tensor | None,
                  past_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of the chunk's last position ``[1, vocab]``, the chunk's keys, values ``[num_layers, T, Hkv, D]``)
    for the prompt tokens ``token_ids`` at positions ``start``.., after the earlier positions' K/V ``past_k``,
    ``past_v`` ``[num_layers, start, Hkv, D]`` (None when ``start`` is 0)."""
    x, keys, values = prefill_hidden(model, token_ids, start, past_k, past_v)
    return model.logits(x[-1:]), keys, values


def prefill_hidden(model, token_ids: torch.Tensor, start: int, past_k: torch.Tensor | None,
                   past_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prefill_chunk`` with the hidden states of every position of the chunk ``[T, hidden]`` in place of the
    last one's logits."""
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
    return x, torch.stack(keys), torch.stack(values)


def prompt_token_logprobs(model, hidden: torch.Tensor, next_token_ids: torch.Tensor,
                          num_top: int) -> list[PromptLogprob]:
    """What the positions of ``hidden`` ``[N, hidden]`` (N >= len(next_token_ids)) say of the prompt tokens that
    follow them, ``next_token_ids`` ``[M]``: each one's logprob, rank and the ``num_top`` most likely tokens
    (vLLM's prompt logprobs: the raw distribution, rank 1 for the best)."""
    chosen, ranks, top_values, top_ids = [], [], [], []
    for first in range(0, next_token_ids.shape[0], PROMPT_LOGPROB_ROWS):
        targets = next_token_ids[first:first + PROMPT_LOGPROB_ROWS]
        logprobs = model.logits(hidden[first:first + targets.shape[0]]).log_softmax(dim=-1)
        token_logprobs = logprobs.gather(1, targets.unsqueeze(1))
        chosen.append(token_logprobs.squeeze(1))
        ranks.append((logprobs > token_logprobs).sum(dim=1) + 1)
        if num_top:
            values, ids = logprobs.topk(num_top, dim=-1)
            top_values.append(values)
            top_ids.append(ids)
        del logprobs  # the slice's [rows, vocab] goes before the next one is made
    chosen_list = torch.cat(chosen).tolist() if chosen else []
    rank_list = torch.cat(ranks).tolist() if ranks else []
    if not top_ids:
        return [PromptLogprob(lp, rank) for lp, rank in zip(chosen_list, rank_list)]
    tops = zip(torch.cat(top_ids).tolist(), torch.cat(top_values).tolist())
    return [PromptLogprob(lp, rank, tuple(zip(ids, values)))
            for lp, rank, (ids, values) in zip(chosen_list, rank_list, tops)]
