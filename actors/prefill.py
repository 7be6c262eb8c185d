"""Prefill on the Executor's device: causal attention over a prompt, keeping its K/V.

The K/V of every layer come back stacked ``[num_layers, T, Hkv, D]`` so they can
go to the owning KV node in one message. A prompt may also be prefilled a chunk
at a time (``prefill_hidden`` at a start position), each chunk written into the
prompt's K/V buffers and attending over the chunks before it there (chunked
prefill: ``fastdecode.actors.chunked_prefill``). A request that asks for
``prompt_logprobs`` also gets the logprob of each prompt token from the positions before it
(``prompt_token_logprobs``), computed a slice of positions at a time so that no ``[T, vocab]`` tensor is kept.
"""
from __future__ import annotations

import torch

from fastdecode.actors.model import prefill_attention
from fastdecode.actors.model.attention import RaggedPrompts, prefill_attention_after, prefill_attention_ragged
from fastdecode.actors.request import PromptLogprob
from fastdecode.actors.sampling import logprob_and_rank

PROMPT_LOGPROB_ROWS = 256  # positions whose logits are made at once: 256 x a 150k vocabulary is 150 MB of float32


def prefill(model, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of the last position ``[1, vocab]``, keys, values) for one prompt."""
    x, keys, values = prefill_hidden(model, token_ids)
    return model.logits(x[-1:]), keys, values


def kv_buffers(model, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty keys, values ``[num_layers, num_tokens, Hkv, D]`` of a prompt, on the model's device."""
    config = model.config
    keys = torch.empty((config.num_layers, num_tokens, config.num_kv_heads, config.head_dim), dtype=model.dtype,
                       device=model.device)
    return keys, torch.empty_like(keys)


def prefill_hidden(model, token_ids: torch.Tensor, start: int = 0, keys: torch.Tensor | None = None,
                   values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states of every position of the chunk ``[T, hidden]``, keys, values) for the prompt tokens
    ``token_ids`` at positions ``start``..``start + T``.

    ``keys``/``values`` ``[num_layers, N, Hkv, D]`` (N >= start + T) hold the K/V of the positions before
    ``start``; each layer writes the chunk's K/V into them and attends over that layer's first ``start + T``
    positions in place, so a long prompt's chunks neither copy its prefix nor hold a second copy of it. None
    (only at ``start`` 0): buffers of exactly T positions are made. Returns the buffers."""
    num_new = token_ids.shape[0]
    end = start + num_new
    if keys is None or values is None:
        if start or keys is not None or values is not None:
            raise ValueError(f"a chunk at position {start} needs the buffers holding the K/V before it")
        keys, values = kv_buffers(model, num_new)
    elif keys.shape != values.shape or keys.shape[1] < end:
        raise ValueError(f"a chunk of positions {start}..{end} needs K/V buffers of at least {end} positions, "
                         f"got {tuple(keys.shape)}, {tuple(values.shape)}")
    positions = torch.arange(start, end, dtype=torch.long, device=token_ids.device)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (prefill_attention(q, k, v) if start == 0
                else prefill_attention_after(q, keys[layer, :end], values[layer, :end]))

    return _run_layers(model, token_ids, positions, keys, values, slice(start, end), attend), keys, values


def prefill_hidden_ragged(model, token_ids: torch.Tensor,
                          prompts: RaggedPrompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states ``[N, hidden]``, keys, values ``[num_layers, N, Hkv, D]``) of several whole prompts laid end
    to end, ``token_ids`` ``[N]`` with N the prompts' ``num_tokens``, in one forward pass: the dense layers run on
    all N rows at once and each prompt attends over its own positions only (``prefill_attention_ragged``)."""
    num_tokens = token_ids.shape[0]
    if prompts.num_tokens != num_tokens:
        raise ValueError(f"prompt lengths {list(prompts.seq_lens)} do not cut {num_tokens} tokens into whole prompts")
    lengths = torch.tensor(prompts.seq_lens)
    starts = torch.repeat_interleave(torch.tensor(prompts.ends) - lengths, lengths)
    positions = (torch.arange(num_tokens) - starts).to(token_ids.device, non_blocking=True)
    keys, values = kv_buffers(model, num_tokens)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return prefill_attention_ragged(q, k, v, prompts)

    return _run_layers(model, token_ids, positions, keys, values, slice(0, num_tokens), attend), keys, values


def _run_layers(model, token_ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                rows: slice, attend) -> torch.Tensor:
    """The forward pass over ``token_ids`` at ``positions``: each layer writes its K/V into ``keys``/``values`` at
    ``rows`` and attends with ``attend(layer, q, k, v)``; the last hidden states ``[T, hidden]``."""
    x = model.embed(token_ids)
    for layer in range(model.num_layers):
        q, k, v = model.pre_attention(layer, x, positions)
        keys[layer, rows] = k
        values[layer, rows] = v
        x = model.post_attention(layer, x, attend(layer, q, k, v))
    return x


def prompt_token_logprobs(model, hidden: torch.Tensor, next_token_ids: torch.Tensor,
                          num_top: int) -> list[PromptLogprob]:
    """What the positions of ``hidden`` ``[N, hidden]`` (N >= len(next_token_ids)) say of the prompt tokens that
    follow them, ``next_token_ids`` ``[M]``: each one's logprob, rank and the ``num_top`` most likely tokens
    (vLLM's prompt logprobs: the raw distribution, rank 1 for the best)."""
    chosen, ranks, top_values, top_ids = [], [], [], []
    for first in range(0, next_token_ids.shape[0], PROMPT_LOGPROB_ROWS):
        targets = next_token_ids[first:first + PROMPT_LOGPROB_ROWS]
        logprobs = model.logits(hidden[first:first + targets.shape[0]]).log_softmax(dim=-1)
        token_logprobs, token_ranks = logprob_and_rank(logprobs, targets)
        chosen.append(token_logprobs)
        ranks.append(token_ranks)
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
