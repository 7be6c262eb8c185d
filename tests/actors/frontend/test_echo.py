"""Completions' ``echo`` on a live ``fdctl serve`` (random:tiny): the choice's text is the prompt's then the
generated text, whole or streamed; ``max_tokens: 0`` with echo returns the prompt alone (vLLM's echo without
generation), and without echo stays a 400."""
from __future__ import annotations

import pytest

from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def reference_text(tiny_model, prompt_ids: list[int], max_tokens: int) -> str:
    model, tokenizer = tiny_model
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return reference_generate(model, tokenizer, prompt_ids, params).text


async def test_echo_prefixes_the_prompt_text(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    expected = reference_text(tiny_model, tokenizer.encode(PROMPT), 6)
    response = await openai_client.completions.create(model="tiny", prompt=[PROMPT, PROMPT], max_tokens=6, echo=True,
                                                      **GREEDY)
    assert [c.text for c in response.choices] == [PROMPT + expected] * 2
    assert response.usage.completion_tokens == 12


async def test_echo_with_max_tokens_0_returns_the_prompt_alone(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    ids = tokenizer.encode(PROMPT)
    response = await openai_client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, **GREEDY)
    (choice,) = response.choices
    assert choice.text == tokenizer.decode(ids, skip_special_tokens=False)  # token ids echo as their text, BOS too
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 0)


async def test_streamed_echo_sends_the_prompt_first(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    expected = reference_text(tiny_model, tokenizer.encode(PROMPT), 5)
    stream = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, echo=True,
                                                    stream=True, stream_options={"include_usage": True}, **GREEDY)
    pieces, usages = [], []
    async for chunk in stream:
        pieces += [c.text for c in chunk.choices]
        if chunk.usage is not None:
            usages.append(chunk.usage.completion_tokens)
    assert pieces[0].startswith(PROMPT) and "".join(pieces) == PROMPT + expected
    assert usages == [5]


async def test_streamed_echo_with_max_tokens_0_is_one_chunk_of_the_prompt(openai_client):
    stream = await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True,
                                                    stream=True, **GREEDY)
    chunks = [(c.text, c.finish_reason) async for chunk in stream for c in chunk.choices]
    assert chunks == [(PROMPT, "length")]


@pytest.mark.parametrize("fields, param", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1, "echo": True},
                                                                                "max_tokens")])
async def test_max_tokens_0_without_echo_is_refused(openai_client, fields, param):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.completions.create(model="tiny", prompt=PROMPT, **fields)
    assert caught.value.body["param"] == param


async def test_min_tokens_with_max_tokens_0_names_the_limit_the_request_gave(openai_client):
    """The echo's max_tokens 0 generates one token behind the scenes; the refusal must not name that 1."""
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True,
                                               extra_body={"min_tokens": 5})
    assert caught.value.body["param"] == "min_tokens"
    assert "min_tokens (5) must not exceed max_tokens (0)" in caught.value.body["message"]


@pytest.mark.parametrize("token_id", [-1, "vocab", 2**32], ids=["negative", "vocab-size", "past-32-bits"])
async def test_echoed_token_ids_outside_the_vocabulary_are_the_400_they_are_without_echo(openai_client, tiny_model,
                                                                                          token_id):
    """The echo decoded the ids before the engine checked them: the tokenizer's OverflowError on -1 was a 500."""
    openai = pytest.importorskip("openai")
    vocab_size = tiny_model[0].config.vocab_size
    prompt = [1, vocab_size if token_id == "vocab" else token_id]
    errors = []
    for echo in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            await openai_client.completions.create(model="tiny", prompt=prompt, echo=echo, max_tokens=1)
        errors.append(caught.value.body)
    assert errors[0] == errors[1]
    assert errors[1]["param"] == "prompt" and f"[0, {vocab_size})" in errors[1]["message"]
