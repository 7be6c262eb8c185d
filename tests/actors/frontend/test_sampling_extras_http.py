"""vLLM's extra sampling fields over HTTP (include_stop_str_in_output, skip_special_tokens,
spaces_between_special_tokens, truncate_prompt_tokens, allowed_token_ids, bad_words): parsed and checked (no
engine), then served by a live ``fdctl serve`` (random:tiny) as the reference engine runs them."""
from __future__ import annotations

import pytest

from conftest import MAX_MODEL_LEN
from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.openai_request import parse_chat, parse_completion, parse_stream_request
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams

PROMPT = [318, 72, 101, 302, 111]  # "<|bos|>Hello"; greedy on random:tiny: "n", 217, "_", " h", "3", "L", "3", ...
CHAT = [{"role": "user", "content": "hi"}]
BOS = 318
GREEDY = {"temperature": 0, "max_tokens": 12}
EXTRAS = {"include_stop_str_in_output": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
          "allowed_token_ids": [9, 3, 9], "bad_words": ["no", "never"], "truncate_prompt_tokens": 7}


@pytest.mark.parametrize("parse, base", [(parse_completion, {"prompt": "hi"}), (parse_chat, {"messages": CHAT}),
                                         (parse_stream_request, {"prompt": "hi"})],
                         ids=["completion", "chat", "websocket"])
def test_the_fields_reach_the_request(parse, base):
    request = parse({**base, **EXTRAS})
    params = request.sampling_params(2, 64)
    assert (params.include_stop_str_in_output, params.skip_special_tokens, params.spaces_between_special_tokens,
            params.allowed_token_ids, params.bad_words) == (True, False, False, (3, 9), ("no", "never"))
    assert request.truncate_prompt_tokens == 7 and params.truncate_prompt_tokens is None  # cut by the server
    defaults = parse(base).sampling_params(2, 64)
    assert (defaults.include_stop_str_in_output, defaults.skip_special_tokens, defaults.spaces_between_special_tokens,
            defaults.allowed_token_ids, defaults.bad_words) == (False, True, True, None, ())


@pytest.mark.parametrize("field, value", [
    ("include_stop_str_in_output", "yes"), ("skip_special_tokens", 0), ("spaces_between_special_tokens", [True]),
    ("allowed_token_ids", "1"), ("allowed_token_ids", [1.5]), ("allowed_token_ids", []), ("allowed_token_ids", [-3]),
    ("bad_words", "word"), ("bad_words", [1]), ("bad_words", [""]), ("bad_words", ["w"] * 129),
    ("bad_words", ["\ud800"]),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2), ("truncate_prompt_tokens", "8"),
])
def test_bad_values_are_a_400_naming_the_field(field, value):
    for parse, base in ((parse_completion, {"prompt": "hi"}), (parse_chat, {"messages": CHAT})):
        with pytest.raises(ApiError) as refused:
            parse({**base, field: value}).sampling_params(2, 64)
        assert (refused.value.status, refused.value.param) == (400, field)


def test_truncation_is_checked_against_the_room_max_tokens_leaves():
    request = parse_completion({"prompt": PROMPT, "max_tokens": 10, "truncate_prompt_tokens": 3})
    assert request.truncated(PROMPT, 64) == PROMPT[-3:]
    assert parse_completion({"prompt": PROMPT, "max_tokens": 60, "truncate_prompt_tokens": -1}).truncated(
        PROMPT, 64) == PROMPT[-4:]
    with pytest.raises(ApiError) as refused:
        parse_completion({"prompt": PROMPT, "max_tokens": 62, "truncate_prompt_tokens": 3}).truncated(PROMPT, 64)
    assert refused.value.param == "truncate_prompt_tokens"


# ---- live ------------------------------------------------------------------------------------------------------
def _reference(tiny_model, prompt=PROMPT, **fields) -> object:
    model, tokenizer = tiny_model
    return reference_generate(model, tokenizer, prompt, SamplingParams(**{"ignore_eos": True, **GREEDY, **fields}))


async def test_a_kept_stop_string_over_http(openai_client, tiny_model):
    expected = _reference(tiny_model, stop=["h3"], include_stop_str_in_output=True)
    body = {"ignore_eos": True, "include_stop_str_in_output": True}
    whole = await openai_client.completions.create(model="tiny", prompt=PROMPT, stop=["h3"], extra_body=body,
                                                   **GREEDY)
    choice = whole.choices[0]
    assert choice.text == expected.text and choice.text.endswith(" h3") and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == "h3"
    chunks = await openai_client.completions.create(model="tiny", prompt=PROMPT, stop=["h3"], extra_body=body,
                                                    stream=True, **GREEDY)
    assert "".join([chunk.choices[0].text async for chunk in chunks if chunk.choices]) == expected.text
    cut = await openai_client.completions.create(model="tiny", prompt=PROMPT, stop=["h3"],
                                                 extra_body={"ignore_eos": True}, **GREEDY)
    assert cut.choices[0].text + "h3" == expected.text


async def test_allowed_ids_and_special_tokens_over_http(openai_client, tiny_model):
    fields = {"allowed_token_ids": [BOS, 72], "skip_special_tokens": False}
    expected = _reference(tiny_model, **fields)
    assert "<|bos|>" in expected.text
    response = await openai_client.completions.create(model="tiny", prompt=PROMPT,
                                                      extra_body={"ignore_eos": True, **fields}, **GREEDY)
    assert response.choices[0].text == expected.text
    skipped = await openai_client.completions.create(
        model="tiny", prompt=PROMPT, extra_body={"ignore_eos": True, "allowed_token_ids": [BOS, 72]}, **GREEDY)
    assert skipped.choices[0].text == expected.text.replace("<|bos|>", "")


async def test_bad_words_over_http(openai_client, tiny_model):
    expected = _reference(tiny_model, bad_words=["3"])
    assert "3" not in expected.text and "3" in _reference(tiny_model).text
    response = await openai_client.completions.create(model="tiny", prompt=PROMPT,
                                                      extra_body={"ignore_eos": True, "bad_words": ["3"]}, **GREEDY)
    assert response.choices[0].text == expected.text


async def test_truncated_prompts_over_http(openai_client, tiny_model):
    tokenizer = tiny_model[1]
    expected = _reference(tiny_model, prompt=PROMPT[-2:])
    body = {"ignore_eos": True, "truncate_prompt_tokens": 2}
    echoed = await openai_client.completions.create(model="tiny", prompt=PROMPT, echo=True, extra_body=body, **GREEDY)
    # the usage and the echo count the prompt that ran: a token-id prompt's echo is its cut tokens' text
    assert echoed.usage.prompt_tokens == 2 and echoed.usage.completion_tokens == 12
    assert echoed.choices[0].text == tokenizer.decode(PROMPT[-2:], skip_special_tokens=False) + expected.text
    text = "The capital of France is"
    by_text = await openai_client.completions.create(model="tiny", prompt=text, echo=True, extra_body=body,
                                                     **GREEDY)
    ids = tokenizer.encode(text)
    assert by_text.usage.prompt_tokens == 2 and len(ids) > 2
    assert by_text.choices[0].text == text + _reference(tiny_model, prompt=ids[-2:]).text  # text as given (vLLM's)
    chat = await openai_client.chat.completions.create(model="tiny", messages=CHAT, extra_body=body, **GREEDY)
    assert chat.usage.prompt_tokens == 2
    too_long = [72] * (MAX_MODEL_LEN + 40)  # would be refused whole: -1 keeps what max_tokens leaves
    cut = await openai_client.completions.create(model="tiny", prompt=too_long,
                                                 extra_body={"ignore_eos": True, "truncate_prompt_tokens": -1},
                                                 **GREEDY)
    assert cut.usage.prompt_tokens == MAX_MODEL_LEN - GREEDY["max_tokens"]


@pytest.mark.parametrize("body, param", [
    ({"allowed_token_ids": [5, 10**6]}, "allowed_token_ids"),
    ({"bad_words": ["  "]}, "bad_words"),
    ({"truncate_prompt_tokens": MAX_MODEL_LEN - 5}, "truncate_prompt_tokens"),  # past the room max_tokens leaves
    ({"allowed_token_ids": [72], "bad_words": ["H"]}, "allowed_token_ids"),  # nothing left to sample
])
async def test_values_the_engine_refuses_are_a_400(openai_client, body, param):
    openai = pytest.importorskip("openai")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            await openai_client.completions.create(model="tiny", prompt=PROMPT, extra_body=body, stream=stream,
                                                   **GREEDY)
        assert caught.value.body["param"] == param
