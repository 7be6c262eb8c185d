"""Single-process reference generation: the result every engine must reproduce.

Prefill runs causally over the whole prompt, then one token at a time with a
``TorchKVCache``; plain loops, no batching, no cleverness.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdecode.actors.detokenize import Detokenizer
from fastdecode.actors.executor_config import check_token_ids
from fastdecode.actors.model.attention import TorchKVCache, prefill_attention
from fastdecode.actors.model.llama import LlamaModel
from fastdecode.actors.model.tokenizer import Tokenizer
from fastdecode.actors.request import GenerationResult, RequestError, SamplingParams
from fastdecode.actors.sampling import SamplingRow, make_generator, sample
from fastdecode.actors.structured_output import GrammarBackend, matcher_for

_SEQ_ID = 0


def check_prompt(prompt_token_ids: Sequence[int], model: LlamaModel, params: SamplingParams | None = None) -> None:
    """Refuse an empty prompt, ids outside the vocabulary, or no room left in the context, and token ids of
    ``params`` outside the vocabulary (``executor_config.check_token_ids``)."""
    config = model.config
    if params is not None:
        check_token_ids(params, config.vocab_size)
    if not prompt_token_ids:
        raise RequestError("the prompt is empty")
    bad = [
        t for t in prompt_token_ids
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size
    ]
    if bad:
        raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary (size {config.vocab_size})")
    if len(prompt_token_ids) >= config.max_position_embeddings:
        raise RequestError(
            f"the prompt has {len(prompt_token_ids)} tokens but the model's context is "
            f"{config.max_position_embeddings} tokens"
        )


def run_tokens(model: LlamaModel, cache: TorchKVCache, seq_id: int, token_ids: Sequence[int],
               start: int) -> torch.Tensor:
    """Hidden states [T, hidden] of ``token_ids`` at positions ``start``, ``start+1``, ...

    ``start == 0`` is a prefill (causal attention over the tokens, their K/V
    stored in the cache); otherwise each token attends over the cache after
    its own K/V is appended.
    """
    device = model.device
    tokens = torch.tensor(list(token_ids), dtype=torch.int64, device=device)
    positions = torch.arange(start, start + len(tokens), dtype=torch.int64, device=device)
    x = model.embed(tokens)
    for layer in range(model.num_layers):
        q, k, v = model.pre_attention(layer, x, positions)
        if start == 0:
            cache.append(seq_id, layer, k, v)
            o = prefill_attention(q, k, v)
        else:
            o = cache.attend(layer, [seq_id] * len(tokens), q, k, v)
        x = model.post_attention(layer, x, o)
    return x


@torch.no_grad()
def reference_generate(
    model: LlamaModel, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams
) -> GenerationResult:
    """Generate one continuation; stops at EOS (unless ignore_eos), a stop token or
    string, ``max_tokens`` or the end of the model's context. One sample, as an engine request: ``params.n`` > 1
    is a RequestError (``SamplingParams.within``)."""
    context = model.config.max_position_embeddings
    params = params.with_bad_words_token_ids(tokenizer)
    prompt = params.truncated_prompt(list(prompt_token_ids), context)
    check_prompt(prompt, model, params)
    params = params.within(context - len(prompt))
    eos_ids = tuple(tokenizer.eos_token_ids or model.config.eos_token_ids)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    result = GenerationResult(prompt_token_ids=prompt)
    # held to as the Executor holds it (matcher_for)
    matcher = params.structured_outputs and matcher_for(GrammarBackend(tokenizer, model.config.vocab_size, eos_ids),
                                                        params)
    row = SamplingRow(params, prompt, result.token_ids, make_generator(params.seed, model.device), matcher)
    detokenizer = Detokenizer.for_params(tokenizer, prompt, params)
    cache = TorchKVCache.for_model(model)
    cache.allocate(_SEQ_ID)
    logits = model.logits(run_tokens(model, cache, _SEQ_ID, prompt, 0)[-1:])
    while True:
        out = sample(logits, [row], eos_token_ids=eos_ids)
        token = int(out.token_ids[0])
        result.token_ids.append(token)
        if out.logprobs is not None:
            result.logprobs.append(float(out.logprobs[0]))
        if matcher:
            matcher.accept_token(token)
        if token in stop_ids or (matcher and matcher.is_terminated()):
            result.finish_reason = "stop"
            detokenizer.finish(token)  # its text kept with include_stop_str_in_output
        elif detokenizer.add(token)[1]:
            result.finish_reason = "stop"
        elif len(result.token_ids) >= params.max_tokens or len(prompt) + len(result.token_ids) >= context:
            result.finish_reason = "length"
        if result.finish_reason is not None:
            break
        position = len(prompt) + len(result.token_ids) - 1
        logits = model.logits(run_tokens(model, cache, _SEQ_ID, [token], position))
    detokenizer.finish()
    result.text = detokenizer.text
    return result
