"""Prompt logprobs in the Executor (random:tiny, float32, CPU, KV in torch): what the full prompt's forward
pass gives, whether the prompt is prefilled whole or in chunks and with other requests in the step; they come
with the first token only, also for a sequence rebuilt after a preemption."""
from __future__ import annotations

import asyncio

import pytest
import torch

from executor_helpers import prompt, start_executor
from fastdecode.actors.chunked_prefill import PrefillJob
from fastdecode.actors.executor import Executor
from fastdecode.actors.executor_config import ExecutorConfig, check_prompt
from fastdecode.actors.model import TorchKVCache
from fastdecode.actors.reference import run_tokens
from fastdecode.actors.request import RequestError, SamplingParams
from fastdecode.actors.sequence import EventChannel, Sequence

ATOL = 1e-4  # chunked attention sums in another order than the whole prompt's


def params(num_top: int | None, max_tokens: int = 3) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=num_top)


@torch.no_grad()
def reference_logprobs(model, prompt_ids: list[int]) -> torch.Tensor:
    """log_softmax of the whole prompt's forward pass ``[T, vocab]``: row i scores token i + 1."""
    cache = TorchKVCache.for_model(model)
    cache.allocate(0)
    return model.logits(run_tokens(model, cache, 0, prompt_ids, 0)).log_softmax(dim=-1)


def check_against_reference(model, prompt_ids: list[int], num_top: int, got) -> None:
    ref = reference_logprobs(model, prompt_ids)
    assert got is not None and len(got) == len(prompt_ids) and got[0] is None
    for position in range(1, len(prompt_ids)):
        row, entry = ref[position - 1], got[position]
        token_logprob = row[prompt_ids[position]]
        assert entry.logprob == pytest.approx(float(token_logprob), abs=ATOL), position
        # 1 + the tokens more likely than it (those within the tolerance of it may go either way)
        assert int((row > token_logprob + ATOL).sum()) < entry.rank <= int((row > token_logprob - ATOL).sum()) + 1
        assert len(entry.top_logprobs) == num_top
        top_values = row.topk(num_top).values.tolist()
        assert [lp for _, lp in entry.top_logprobs] == pytest.approx(top_values, abs=ATOL), position
        for token_id, logprob in entry.top_logprobs:  # each named token has the logprob the reference gives it
            assert float(row[token_id]) == pytest.approx(logprob, abs=ATOL)


async def events_of(stream) -> list:
    return [event async for event in stream]


@pytest.mark.parametrize("max_num_batched_tokens", [0, 64], ids=["whole", "chunks-of-64"])
async def test_prompt_logprobs_are_the_full_forward_pass(tiny_model, max_num_batched_tokens):
    """Several requests at once (one of 150 tokens, prefilled in three chunks under a 64-token budget), one of
    them asking for none: each gets its own prompt's logprobs on its first event and on no other."""
    model, _ = tiny_model
    asks = [(prompt(150, 1), 5), (prompt(7, 2), 0), (prompt(40, 3), None), (prompt(90, 4), 20)]
    executor, _ = await start_executor(model, max_num_batched_tokens)
    try:
        streams = [executor.submit(ids, params(num_top)) for ids, num_top in asks]
        results = await asyncio.gather(*(events_of(s) for s in streams))
    finally:
        await executor.stop()
    for (prompt_ids, num_top), events in zip(asks, results):
        assert [e.finish_reason for e in events] == [None, None, "length"]
        assert all(e.prompt_logprobs is None for e in events[1:])
        if num_top is None:
            assert events[0].prompt_logprobs is None
        else:
            check_against_reference(model, prompt_ids, num_top, events[0].prompt_logprobs)


async def test_a_sequence_rebuilt_after_a_preemption_does_not_send_them_again(tiny_model):
    """A 64-token node, overcommitted: the younger sequence is preempted once it has tokens out, rebuilt from
    prompt plus output, and its stream still has the prompt logprobs on the first event only."""
    model, _ = tiny_model
    executor, _ = await start_executor(model, 0, node_tokens=64, overcommit=2.0)
    preempted_with: list[int] = []  # tokens out when the sequence was preempted
    real_preempt = executor._preempt

    async def preempt(seq, node_index):
        preempted_with.append(len(seq.output_ids))
        await real_preempt(seq, node_index)

    executor._preempt = preempt
    try:
        running = executor.submit(prompt(4, 2), params(None, 56))
        first = await anext(running)
        younger = executor.submit(prompt(8, 3), params(2, 30))
        _, events = await asyncio.gather(events_of(running), events_of(younger))
    finally:
        await executor.stop()
    assert first.prompt_logprobs is None
    assert preempted_with and all(n > 0 for n in preempted_with), preempted_with
    assert events[-1].finish_reason == "length" and len(events) == 30
    assert [e.index for e in events if e.prompt_logprobs is not None] == [0]
    check_against_reference(model, prompt(8, 3), 2, events[0].prompt_logprobs)


def test_a_resumed_prefill_computes_no_prompt_logprobs():
    fresh = Sequence(1, [5, 6, 7], params(3), EventChannel())
    resumed = Sequence(2, [5, 6, 7], params(3), EventChannel(), output_ids=[9, 10])
    assert PrefillJob.for_sequence(fresh, 0).num_prompt_logprobs == 3
    assert PrefillJob.for_sequence(resumed, 0).num_prompt_logprobs is None


def test_more_logprobs_than_the_engine_allows_are_refused_at_submission():
    """As vLLM's --max-logprobs (default 20; -1: the vocabulary, which also caps any larger limit)."""
    for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
        with pytest.raises(RequestError, match=f"Requested {kind} logprobs of 21, which is greater than max allowed: "
                                               "20") as caught:
            check_prompt([1, 2], 100, 50, SamplingParams(**{name: 21}), max_logprobs=20)
        assert caught.value.param == name
        check_prompt([1, 2], 100, 50, SamplingParams(**{name: 20}), max_logprobs=20)
        check_prompt([1, 2], 100, 50, SamplingParams(**{name: 100}), max_logprobs=-1)
        for limit in (-1, 1000):
            with pytest.raises(RequestError, match="max allowed: 100"):
                check_prompt([1, 2], 100, 50, SamplingParams(**{name: 101}), max_logprobs=limit)
    with pytest.raises(ValueError, match="max_logprobs"):
        ExecutorConfig(max_logprobs=-2)
    # -1 asks for the whole vocabulary (vLLM's), which the engine's limit must allow
    whole = check_prompt([1, 2], 100, 50, SamplingParams(logprobs=-1, prompt_logprobs=-1), max_logprobs=-1)
    assert (whole.logprobs, whole.prompt_logprobs) == (100, 100)
    with pytest.raises(RequestError, match="Requested sample logprobs of 100, which is greater than max allowed: 20"):
        check_prompt([1, 2], 100, 50, SamplingParams(logprobs=-1), max_logprobs=20)


@pytest.mark.parametrize("value", [-2, 1.5, True])
def test_prompt_logprobs_out_of_range_are_refused(value):
    with pytest.raises(RequestError) as caught:
        SamplingParams(prompt_logprobs=value)
    assert caught.value.param == "prompt_logprobs"



async def test_logprobs_of_the_whole_vocabulary():
    """vLLM's logprobs=-1 and prompt_logprobs=-1: every token's logprob, where the engine's max_logprobs allows."""
    from api_helpers import TINY
    from fastdecode.actors.api import AsyncLLM

    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=-1, prompt_logprobs=-1)
    async with await AsyncLLM.start(**TINY, max_logprobs=-1) as llm:
        result = await llm.generate([5, 6, 7], params)
        vocab_size = llm.model_config.vocab_size
    assert [len(position) for position in result.outputs[0].logprobs] == [vocab_size] * 2
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs[1]) == vocab_size
