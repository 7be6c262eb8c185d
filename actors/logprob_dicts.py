"""Logprobs in vLLM's shape: per position ``{token id: Logprob}`` of the token there, then of the most likely ones
(``RequestOutput.prompt_logprobs``, ``CompletionOutput.logprobs``)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from fastdecode.actors.request import Logprob, PromptLogprob


def prompt_logprob_dicts(prompt_ids: Sequence[int], prompt_logprobs: Sequence[PromptLogprob | None],
                         token_text: Callable[[int], str]) -> list[dict[int, Logprob] | None]:
    """The engine's prompt logprobs in vLLM's shape: None for the first prompt token, then per prompt token
    ``{token id: Logprob}`` of that token, then of the most likely ones there (each token once), their text from
    ``token_text`` (``Tokenizer.token_text``, which decodes each token once)."""
    dicts: list[dict[int, Logprob] | None] = []
    for token_id, entry in zip(prompt_ids, prompt_logprobs):
        if entry is None:
            dicts.append(None)
            continue
        dicts.append(_position(token_id, entry.logprob, entry.rank, entry.top_logprobs, token_text))
    return dicts


def sample_logprob_dicts(token_ids: Sequence[int], logprobs: Sequence[float], ranks: Sequence[int | None],
                         tops: Sequence[Sequence[tuple[int, float]]],
                         token_text: Callable[[int], str]) -> list[dict[int, Logprob]]:
    """The generated tokens' logprobs in vLLM's shape (``CompletionOutput.logprobs``): per token ``{token id: Logprob}``
    of the sampled token (with its rank in the whole distribution), then of the most likely ones there (rank 1 the
    likeliest)."""
    return [_position(token_id, logprob, rank, top, token_text)
            for token_id, logprob, rank, top in zip(token_ids, logprobs, ranks, tops)]


def _position(token_id: int, logprob: float, rank: int | None, top: Sequence[tuple[int, float]],
              token_text: Callable[[int], str]) -> dict[int, Logprob]:
    """One position's ``{token id: Logprob}``: the token there first, then the most likely ones (ranked from 1), each
    token once."""
    position = {token_id: Logprob(logprob, rank, token_text(token_id))}
    for top_rank, (top_id, value) in enumerate(top, start=1):
        if top_id not in position:
            position[top_id] = Logprob(value, top_rank, token_text(top_id))
    return position
