"""The OpenAI-compatible routes of a live ``fdctl serve``, driven by the official ``openai`` client.

Outputs must equal the single-process reference (``reference_generate``) for
the same prompt and sampling fields.
"""
from __future__ import annotations

import json

import aiohttp
import pytest

from conftest import API_KEY
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]


def reference(tiny_model, prompt_ids, **fields):
    model, tokenizer = tiny_model
    return reference_generate(model, tokenizer, prompt_ids, SamplingParams(**fields))


async def test_completion_greedy_equals_reference(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    expected = reference(tiny_model, tokenizer.encode(PROMPT), max_tokens=24, temperature=0.0, ignore_eos=True)
    response = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                                      extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert response.object == "text_completion"
    assert response.model == "tiny"
    assert response.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert response.usage.completion_tokens == 24
    assert response.usage.total_tokens == response.usage.prompt_tokens + 24


async def test_streaming_completion_with_usage(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    expected = reference(tiny_model, tokenizer.encode(PROMPT), max_tokens=20, temperature=0.0, ignore_eos=True)
    stream = await openai_client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    pieces, reasons, usages = [], [], []
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert "".join(pieces) == expected.text
    assert len(pieces) > 1, "the text must arrive in several chunks"
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert len(usages) == 1 and usages[0].completion_tokens == 20


async def test_prompt_as_token_ids_equals_text_prompt(openai_client, tiny_model):
    ids = tiny_model[1].encode(PROMPT)
    by_text = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    by_ids = await openai_client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("is_stream", [False, True])
async def test_chat_completion_equals_reference(openai_client, tiny_model, is_stream):
    tokenizer = tiny_model[1]
    expected = reference(tiny_model, tokenizer.encode_chat(MESSAGES), max_tokens=16, temperature=0.0,
                         ignore_eos=True)
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    if not is_stream:
        response = await openai_client.chat.completions.create(**kwargs)
        assert response.object == "chat.completion"
        assert response.choices[0].message.role == "assistant"
        assert response.choices[0].message.content == expected.text
        assert response.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
        return
    stream = await openai_client.chat.completions.create(**kwargs, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_seeded_sampling_and_penalties_equal_reference(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    fields = dict(max_tokens=24, temperature=0.8, top_p=0.9, top_k=40, seed=1234, presence_penalty=0.5,
                  frequency_penalty=0.3, repetition_penalty=1.2, min_tokens=4, ignore_eos=True)
    expected = reference(tiny_model, tokenizer.encode(PROMPT), **fields)
    response = await openai_client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0.8, top_p=0.9, seed=1234, presence_penalty=0.5,
        frequency_penalty=0.3,
        extra_body={"top_k": 40, "repetition_penalty": 1.2, "min_tokens": 4, "ignore_eos": True})
    assert response.choices[0].text == expected.text


async def test_tiny_temperature_is_greedy(openai_client, tiny_model):
    """1e-300 underflows to 0 in float32: it must be greedy, not NaN probabilities and token 0 every step."""
    tokenizer = tiny_model[1]
    expected = reference(tiny_model, tokenizer.encode(PROMPT), max_tokens=12, temperature=0.0, ignore_eos=True)
    response = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1e-300,
                                                      logprobs=1, extra_body={"ignore_eos": True})
    assert response.choices[0].text == expected.text


async def test_stop_string_cuts_the_text(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    full = reference(tiny_model, tokenizer.encode(PROMPT), max_tokens=32, temperature=0.0, ignore_eos=True).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(stop) == 2
    expected = full[: full.index(stop)]
    response = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0,
                                                      stop=[stop], extra_body={"ignore_eos": True})
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "stop"


async def test_completion_logprobs(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    expected = reference(tiny_model, tokenizer.encode(PROMPT), max_tokens=8, temperature=0.0, ignore_eos=True,
                         logprobs=3)
    response = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                                      logprobs=3, extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == 8
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    # greedy: the chosen token is the most likely one (top entries are keyed by text, so may merge)
    assert all(max(top.values()) <= lp + 1e-5 for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    stream = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                                    logprobs=3, stream=True, extra_body={"ignore_eos": True})
    offsets = [o for chunk in [c async for c in stream] if chunk.choices and chunk.choices[0].logprobs
               for o in chunk.choices[0].logprobs.text_offset]
    assert offsets == logprobs.text_offset  # streamed chunks go on counting where the last one ended


async def test_chat_logprobs(openai_client):
    response = await openai_client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in content)
    assert all(item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob for item in content)


async def test_models_lists_the_served_name(openai_client):
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def test_raw_event_stream_ends_with_done(tiny_server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        async with session.post(tiny_server.url + "/v1/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = (await response.read()).decode()
    events = [part for part in raw.split("\n\n") if part]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)
