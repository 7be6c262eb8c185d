"""n samples of one request through the embedding API (``SamplingParams.n``, vLLM's parallel sampling): one
GenerationResult whose ``outputs`` are the n samples, sample i the single request seeded ``seed + i``; one token
stream is one sample, so ``stream`` and the engine's own ``submit`` refuse n > 1."""
from __future__ import annotations

import asyncio
import threading

import pytest

from api_helpers import PROMPT, THREAD_WAIT_S, is_idle, llm, until, until_idle  # noqa: F401 (llm: a fixture)
from fastdecode.actors.executor_config import QueueFullError
from fastdecode.actors.request import GenerationResult, RequestError, SamplingParams

SAMPLED = dict(temperature=0.8, max_tokens=6, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True, n=3)  # runs well past any wait below


@pytest.mark.parametrize("n", [0, -1, "2", 2.0, True, None])
def test_n_must_be_a_positive_int(n):
    with pytest.raises(RequestError, match="n must be a positive integer") as info:
        SamplingParams(n=n)
    assert info.value.param == "n"


def test_samples_are_one_engine_request_each_seeded_seed_plus_i():
    params = SamplingParams(n=3, seed=5, temperature=0.8, prompt_logprobs=2, logprobs=1)
    samples = params.samples()
    assert [(p.n, p.seed, p.temperature, p.logprobs) for p in samples] == [(1, 5, 0.8, 1), (1, 6, 0.8, 1),
                                                                           (1, 7, 0.8, 1)]
    assert [p.prompt_logprobs for p in samples] == [2, 2, 2]  # each its own (the HTTP choices show theirs)
    unseeded = SamplingParams(n=2).samples()
    assert [(p.n, p.seed) for p in unseeded] == [(1, None), (1, None)]
    assert SamplingParams().samples() == [SamplingParams()]


def test_samples_may_ask_the_prompts_logprobs_of_sample_0_alone():
    """generate's samples (vLLM's RequestOutput has the prompt's logprobs once); the HTTP choices keep each its own."""
    params = SamplingParams(n=3, seed=5, temperature=0.8, prompt_logprobs=2, logprobs=1)
    once = params.samples(is_prompt_logprobs_once=True)
    assert [p.prompt_logprobs for p in once] == [2, None, None]
    assert [(p.n, p.seed, p.logprobs) for p in once] == [(1, 5, 1), (1, 6, 1), (1, 7, 1)]
    assert once[0] == params.samples()[0]
    assert SamplingParams(prompt_logprobs=2).samples(is_prompt_logprobs_once=True) == [
        SamplingParams(prompt_logprobs=2)]


def test_outputs_list_every_sample_with_its_index():
    first = GenerationResult(prompt_token_ids=[1], token_ids=[5], text="a", finish_reason="length")
    others = [GenerationResult(prompt_token_ids=[1], token_ids=[6 + i], text="bc"[i], finish_reason="stop")
              for i in range(2)]
    first.other_samples = others
    outputs = first.outputs
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in outputs] == [
        (0, "a", [5], "length"), (1, "b", [6], "stop"), (2, "c", [7], "stop")]
    assert "index=2" in repr(outputs[2])
    with pytest.raises(AttributeError):
        outputs[1].index = 0  # read-only, as the rest of the view


async def test_n_seeded_samples_are_the_single_requests_of_seed_plus_i(llm):
    result = await llm.generate(PROMPT, SamplingParams(n=3, seed=3, **SAMPLED))
    singles = [await llm.generate(PROMPT, SamplingParams(seed=3 + i, **SAMPLED)) for i in range(3)]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert [(o.token_ids, o.text, o.finish_reason) for o in result.outputs] == [
        (s.token_ids, s.text, s.finish_reason) for s in singles]
    assert len({tuple(s.token_ids) for s in singles}) > 1  # the seeds do differ: not one sample three times
    # the result's own fields are sample 0's, as before n
    assert (result.token_ids, result.text) == (singles[0].token_ids, singles[0].text)
    assert await is_idle(llm)


async def test_n_greedy_samples_are_identical(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    single = await llm.generate(PROMPT, greedy)
    result = await llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=2))
    assert [o.token_ids for o in result.outputs] == [single.token_ids] * 2
    assert [o.text for o in result.outputs] == [single.text] * 2


async def test_prompt_logprobs_once_and_logprobs_per_sample(llm):
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    single = await llm.generate(PROMPT, params)
    result = await llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                                       prompt_logprobs=1, logprobs=1, n=2))
    # the same prompt logprobs, to float noise: the n requests' prefills may be batched together, the single's alone
    assert len(result.prompt_logprobs) == len(single.prompt_logprobs) == len(PROMPT)
    for position, expected in zip(result.prompt_logprobs, single.prompt_logprobs):
        assert (position is None) == (expected is None)
        if position is not None:
            assert {t: (lp.rank, lp.decoded_token) for t, lp in position.items()} == {
                t: (lp.rank, lp.decoded_token) for t, lp in expected.items()}
            assert [lp.logprob for lp in position.values()] == pytest.approx(
                [lp.logprob for lp in expected.values()], abs=1e-4)
    assert result.other_samples[0].prompt_logprobs is None  # asked of sample 0 alone
    for output in result.outputs:  # each sample's own, as the single request's (to float noise: batched apart)
        assert [list(p) for p in output.logprobs] == [list(p) for p in single.position_logprobs]
        assert output.cumulative_logprob == pytest.approx(single.outputs[0].cumulative_logprob, abs=1e-4)


async def test_the_prompts_logprobs_are_computed_for_sample_0_alone(llm, monkeypatch):
    """vLLM's RequestOutput has the prompt's logprobs once: generate asks the engine for them once, however many
    samples (the HTTP choices ask each, ``GenerateRequest.samples_params``)."""
    submit, submitted = llm.cluster.submit, []
    monkeypatch.setattr(llm.cluster, "submit", lambda ids, params: submitted.append(params) or submit(ids, params))
    params = SamplingParams(temperature=0.8, max_tokens=2, seed=4, prompt_logprobs=1, logprobs=1, n=3)
    result = await llm.generate(PROMPT, params)
    assert [(p.n, p.seed, p.prompt_logprobs, p.logprobs) for p in submitted] == [(1, 4, 1, 1), (1, 5, None, 1),
                                                                               (1, 6, None, 1)]
    assert len(result.prompt_logprobs) == len(PROMPT) and len(result.outputs) == 3
    assert await is_idle(llm)


@pytest.mark.parametrize("n", [1, 3])
async def test_a_shutdown_while_the_prompt_is_tokenized_submits_none_of_its_samples(llm, monkeypatch, n):
    """n samples are submitted as one sample is: a shutdown while the text prompt is tokenized refuses them as
    "LLM is closed" and none reaches the engine (n > 1 used to reach the stopping engine: an UnavailableError)."""
    submitted, is_tokenizing, tokenizing = [], threading.Event(), threading.Event()
    submit, tokenize = llm.cluster.submit, llm.tokenize
    monkeypatch.setattr(llm.cluster, "submit", lambda *args: submitted.append(args) or submit(*args))
    monkeypatch.setattr(llm, "tokenize",
                        lambda prompt: is_tokenizing.set() or tokenizing.wait(THREAD_WAIT_S) and tokenize(prompt))
    task = asyncio.ensure_future(llm.generate("Hello there", SamplingParams(max_tokens=4, n=n)))
    await until(is_tokenizing.is_set)
    stopping = llm.shutdown()
    tokenizing.set()  # the tokenizer's thread goes on only now
    with pytest.raises(RuntimeError, match="LLM is closed"):
        await asyncio.wait_for(task, timeout=2.0)
    await asyncio.wait_for(stopping, timeout=THREAD_WAIT_S)
    assert submitted == []


async def test_stream_and_submit_refuse_n(llm):
    with pytest.raises(RequestError, match="use generate") as info:
        llm.stream(PROMPT, SamplingParams(n=2))
    assert info.value.param == "n"
    for submit in (llm.submit, llm.cluster.submit, llm.cluster.executor.submit):  # the engine runs one sample
        with pytest.raises(RequestError, match="n=2") as info:
            submit(PROMPT, SamplingParams(n=2))
        assert info.value.param == "n"
    assert await is_idle(llm)


async def test_more_samples_than_the_queue_holds_are_refused(llm):
    max_queue = llm.max_num_choices
    with pytest.raises(RequestError, match=f"n={max_queue + 1}") as info:
        await llm.generate(PROMPT, SamplingParams(n=max_queue + 1))
    assert info.value.param == "n"
    with pytest.raises(RequestError, match="prompt 1") as info:
        llm.prepare_batch([PROMPT, PROMPT], [SamplingParams(), SamplingParams(n=max_queue + 1)])
    assert info.value.param == "n"


async def test_abort_of_a_named_request_ends_all_its_samples(llm):
    executor = llm.cluster.executor
    task = asyncio.ensure_future(llm.generate(PROMPT, LONG, "three"))
    await until(lambda: executor.num_running == 3)
    await llm.abort("three")
    result = await asyncio.wait_for(task, timeout=2.0)
    assert [o.finish_reason for o in result.outputs] == ["abort"] * 3
    assert all(len(o.token_ids) < 50 for o in result.outputs) and result.request_id == "three"
    assert await is_idle(llm)


async def test_a_refused_sample_cancels_those_submitted_before_it(llm, monkeypatch):
    submit, num_submitted = llm.cluster.submit, []

    def third_refused(prompt_ids, params):
        num_submitted.append(1)
        if len(num_submitted) == 3:
            raise QueueFullError("too many requests waiting (2)")
        return submit(prompt_ids, params)

    monkeypatch.setattr(llm.cluster, "submit", third_refused)
    with pytest.raises(QueueFullError):
        await llm.generate(PROMPT, LONG)
    await until_idle(llm)
    assert len(num_submitted) == 3
