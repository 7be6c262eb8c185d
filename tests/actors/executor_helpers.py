"""Reference greedy runs (with the top-2 gaps the equality rule needs) and stream collection."""
from __future__ import annotations

import torch

from fastdecode.actors.model import TorchKVCache
from fastdecode.actors.reference import run_tokens
from greedy_compare import top2_gap


@torch.no_grad()
def reference_greedy(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """The single-process reference's greedy tokens (EOS ignored) and top-2 gap at each."""
    cache = TorchKVCache.for_model(model)
    cache.allocate(0)
    logits = model.logits(run_tokens(model, cache, 0, prompt_ids, 0)[-1:])[0]
    tokens, gaps = [], []
    for _ in range(num_tokens):
        gaps.append(top2_gap(logits))
        tokens.append(int(logits.argmax()))
        position = len(prompt_ids) + len(tokens) - 1
        logits = model.logits(run_tokens(model, cache, 0, [tokens[-1]], position))[0]
    return tokens, gaps


async def collect(stream) -> tuple[list[int], str | None]:
    """All token ids of a request stream and its finish reason."""
    tokens, reason = [], None
    async for event in stream:
        if event.token_id >= 0:
            tokens.append(event.token_id)
        reason = event.finish_reason
    return tokens, reason
