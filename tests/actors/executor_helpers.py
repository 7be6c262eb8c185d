"""Reference greedy runs (with the top-2 gaps the equality rule needs), stream collection, and the tiny model's
Executor on one local KV node with its prompts and greedy parameters."""
from __future__ import annotations

import torch

from fastdecode.actors.executor import Executor, ExecutorConfig
from fastdecode.actors.kv_nodes import LocalKVNode
from fastdecode.actors.model import TorchKVCache
from fastdecode.actors.reference import run_tokens
from fastdecode.actors.request import SamplingParams
from fastdecode.scheduler import SchedulerConfig
from greedy_compare import top2_gap

TINY_TOKEN_BYTES = 512  # random:tiny's K and V of one token over its 2 layers, float32


def prompt(length: int, salt: int = 0) -> list[int]:
    return [3 + (i * 31 + salt * 17) % 250 for i in range(length)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def start_executor(model, max_num_batched_tokens: int, *, num_nodes: int = 1, node_tokens: int = 32768,
                         overcommit: float = 1.0, wrap=None) -> tuple[Executor, list]:
    """A started Executor of ``model`` on ``num_nodes`` local KV nodes of ``node_tokens`` tokens each (each through
    ``wrap(node)`` where given), all-at-once admission; and its nodes."""
    nodes = [LocalKVNode.for_model(f"n{i}", model, node_tokens * TINY_TOKEN_BYTES) for i in range(num_nodes)]
    if wrap is not None:
        nodes = [wrap(node) for node in nodes]
    config = ExecutorConfig(max_num_batched_tokens=max_num_batched_tokens, is_pipelined=False,
                            scheduler=SchedulerConfig(admission="all-at-once", overcommit=overcommit))
    executor = Executor(model, nodes, config, eos_token_ids=[])
    await executor.start()
    return executor, nodes


def one_prompt_per_pass(monkeypatch) -> None:
    """Cut every prefill pass to one prompt (passes of at most one token), as before prompts shared passes: for the
    tests of what happens between one pass and the next."""
    import fastdecode.actors.prefill_passes as prefill_passes

    real = prefill_passes.forward_passes
    monkeypatch.setattr(prefill_passes, "forward_passes", lambda work, _, kind: real(work, 1, kind))


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
