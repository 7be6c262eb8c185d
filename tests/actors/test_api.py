"""AsyncLLM over a tiny in-process cluster: its text equals the reference engine's."""
from __future__ import annotations

import contextlib

import pytest
import torch

from api_helpers import LONG, PROMPT, TINY, llm, until, until_idle  # noqa: F401 (llm: a fixture)
from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.async_llm import check_text_fits, max_text_chars
from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import RequestError, SamplingParams


async def _serve(params: SamplingParams):
    async with await AsyncLLM.start(ClusterConfig(**TINY)) as llm:
        return await llm.generate(PROMPT, params)


def _free_run(tiny_model):
    model, tokenizer = tiny_model
    return reference_generate(model, tokenizer, PROMPT, SamplingParams(temperature=0.0, max_tokens=12,
                                                                       ignore_eos=True))


async def test_stop_string_waits_for_min_tokens(tiny_model):
    """The 5th and the 7th tokens are "3": with min_tokens=5 the first is text of the first
    min_tokens tokens, which vLLM never searches, so the request stops on the second."""
    model, tokenizer = tiny_model
    free = _free_run(tiny_model)
    assert [tokenizer.decode([t]) for t in free.token_ids[4:7]] == ["3", "L", "3"]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5, stop=("3",), ignore_eos=True)
    ours = await _serve(params)
    reference = reference_generate(model, tokenizer, PROMPT, params)
    assert ours.token_ids == free.token_ids[:7] and ours.finish_reason == "stop"
    assert ours.text == tokenizer.decode(free.token_ids[:6]) and ours.text.endswith("3L")
    assert (reference.token_ids, reference.text, reference.finish_reason) == (ours.token_ids, ours.text, "stop")


async def test_stop_token_text_is_left_out(tiny_model):
    """A stop token id counts as a generated token but its text is not output (vLLM without
    include_stop_str_in_output), as in the reference engine."""
    model, tokenizer = tiny_model
    free = _free_run(tiny_model)
    stop_id = free.token_ids[4]  # "3", first seen at the 5th token
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_id,), ignore_eos=True)
    ours = await _serve(params)
    reference = reference_generate(model, tokenizer, PROMPT, params)
    assert ours.token_ids == free.token_ids[:5] and ours.finish_reason == "stop"
    assert ours.text == tokenizer.decode(free.token_ids[:4]) and "3" not in ours.text
    assert (reference.token_ids, reference.text, reference.finish_reason) == (ours.token_ids, ours.text, "stop")


async def test_aclose_frees_a_named_stream_at_once(llm):
    executor = llm.cluster.executor
    outputs = llm.stream(PROMPT, LONG)
    async for out in outputs:
        if out.token_id >= 0 and executor.num_running == 1:
            break
    assert executor.num_running == 1 and (await llm.cluster.kv_used_bytes())[0] > 0
    await outputs.aclose()
    await until(lambda: executor.num_running == 0, timeout_s=0.5)
    assert await llm.cluster.kv_used_bytes() == [0]


async def test_a_submitted_stream_dropped_unread_cancels_its_request(llm):
    """An app that submits, then fails before it reads or closes the stream: the request used to run on to its
    max_tokens, holding a batch slot and its KV."""
    import gc

    executor = llm.cluster.executor
    submitted = llm.submit(PROMPT, LONG)
    await until(lambda: executor.num_running == 1)
    del submitted
    gc.collect()
    await until_idle(llm, timeout_s=1.0)


async def test_aclosing_context_frees_on_early_exit(llm):
    async with contextlib.aclosing(llm.stream(PROMPT, LONG)) as outputs:
        async for out in outputs:
            break
    assert out.token_id >= 0
    await until_idle(llm)


async def test_breaking_an_inline_stream_frees_at_once(llm):
    """README "Embedding API": leaving an inline ``async for out in llm.stream(...)`` (nothing else holds the
    generator) cancels the request at once, with no aclose() or aclosing() of the caller's; the 1500-token request
    would run on well past the half second otherwise."""
    executor = llm.cluster.executor
    async for out in llm.stream(PROMPT, LONG):
        if out.token_id >= 0 and executor.num_running == 1:
            break
    assert executor.num_running == 1  # running when left (it is cancelled on the loop's next turns)
    await until_idle(llm)


async def test_stream_checks_its_arguments_when_called(llm):
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        llm.stream(PROMPT, {"max_tokens": 4})
    with pytest.raises(TypeError, match="prompt"):
        llm.stream(3.5, SamplingParams())
    with pytest.raises(TypeError, match="integers"):
        llm.stream([1, "a"], SamplingParams())
    # None: the default SamplingParams(), unseeded: its draws come from torch's global generator, whose state
    # depends on the tests run before (one order drew EOS at the third token); seeded here, it runs to its limit
    torch.manual_seed(0)
    texts = [out.text async for out in llm.stream("hi", None)]
    assert len(texts) == SamplingParams().max_tokens


async def test_prompt_forms(llm):
    text_ids = llm.tokenizer.encode("hello")
    assert llm.tokenize("hello").token_ids == text_ids and llm.tokenize("hello").text == "hello"
    assert llm.tokenize({"prompt": "hello"}).token_ids == text_ids
    assert llm.tokenize({"prompt_token_ids": PROMPT}).token_ids == PROMPT
    assert llm.tokenize(tuple(PROMPT)).token_ids == PROMPT
    for bad in ({"text": "hello"}, {}, {"prompt": 3}, {"prompt_token_ids": "abc"}, b"hi", None):
        with pytest.raises(TypeError):
            llm.tokenize(bad)
    result = await llm.generate({"prompt": "hello"}, SamplingParams(temperature=0.0, max_tokens=3))
    assert (result.prompt, result.prompt_token_ids, len(result.token_ids)) == ("hello", text_ids, 3)
    assert result.outputs[0].text == result.text and result.outputs[0].token_ids is result.token_ids


@pytest.mark.parametrize("ending", ["running", "length", "stop_token_ids", "stop"])
async def test_prompt_logprobs_come_on_the_first_output_however_it_ends(llm, tiny_model, ending):
    """The first output carries the prompt's logprobs whether the request goes on or ends with its first token
    (its length, a stop token id, a stop string); no other output does."""
    first_id = _free_run(tiny_model).token_ids[0]
    fields = {"running": {}, "length": {"max_tokens": 1}, "stop_token_ids": {"stop_token_ids": (first_id,)},
              "stop": {"stop": (tiny_model[1].decode([first_id]),)}}[ending]
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 3, "ignore_eos": True, "prompt_logprobs": 1,
                               **fields})
    outputs = [out async for out in llm.stream(PROMPT, params)]
    assert len(outputs) == (3 if ending == "running" else 1)
    assert outputs[-1].finish_reason == ("length" if ending in ("running", "length") else "stop")
    assert [out.prompt_logprobs is not None for out in outputs] == [True] + [False] * (len(outputs) - 1)
    shown = outputs[0].prompt_logprobs
    assert len(shown) == len(PROMPT) and shown[0] is None and all(len(e.top_logprobs) == 1 for e in shown[1:])


async def test_closed_llm_refuses_requests():
    llm = await AsyncLLM.start(ClusterConfig(**TINY))
    await llm.stop()
    await llm.stop()  # twice is fine
    with pytest.raises(RuntimeError, match="LLM is closed"):
        llm.stream(PROMPT, SamplingParams())
    with pytest.raises(RuntimeError, match="LLM is closed"):
        await llm.generate(PROMPT)


async def test_text_past_what_the_context_holds_is_refused_by_one_limit(llm):
    """``max_text_chars`` is the limit of both ``AsyncLLM.max_prompt_chars`` and ``check_text_fits``: text at it
    passes, a character more is refused (untokenized), naming the field."""
    assert llm.max_prompt_chars == max_text_chars(llm.max_model_len, llm.tokenizer.max_chars_per_token)
    assert max_text_chars(64, 3) == 192
    check_text_fits(192, 64, 3)
    with pytest.raises(RequestError) as info:
        check_text_fits(193, 64, 3, "messages")
    assert info.value.param == "messages"
    assert str(info.value) == ("the text of the messages is too long for this model's context: 193 characters, more "
                               "than its 64 tokens can hold (at most 192)")
