"""vLLM fields that change output: refused with 400 naming the field, or supported; tool checks; the
``param`` of a sampling value out of range; stop reasons; logprob shapes and bytes.  No engine runs."""
from __future__ import annotations

import pytest

from fastdecode.actors.api import StreamOutput
from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.openai_request import parse_chat, parse_completion, parse_stream_request
from fastdecode.actors.frontend.openai_response import ResponseBuilder
from fastdecode.actors.model.synthetic_tokenizer import CHAT_TEMPLATE, EOS_TOKEN, EOS_TOKEN_ID
from synthetic_tokenizers import synthetic_tokenizer

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"prompt": "hi"}


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_tokenizer(chat_template=CHAT_TEMPLATE)


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("field, value", [
    ("structured_outputs", {"json": {"type": "object"}, "structural_tag": "x"}), ("logprob_token_ids", [1, 2]),
    ("truncation_side", "left"),
    ("thinking_token_budget", 10)])
@pytest.mark.parametrize("parse, base", [(parse_completion, PROMPT), (parse_chat, CHAT)], ids=["completion", "chat"])
def test_output_changing_vllm_fields_are_refused_on_both_routes(parse, base, field, value):
    assert refused(parse, {**base, field: value}).param == field


@pytest.mark.parametrize("field, value", [("echo", True), ("chat_template", "{{ messages }}")])
def test_chat_only_fields_are_refused(field, value):
    assert refused(parse_chat, {**CHAT, field: value}).param == field
    parse_chat({**CHAT, field: None})  # the harmless value passes


def test_completion_response_format_of_an_unknown_type_is_refused():
    assert refused(parse_completion, {**PROMPT, "response_format": {"type": "xml"}}).param == "response_format"
    assert refused(parse_completion, {**PROMPT, "response_format": {"type": "json_schema"}}).param == "response_format"
    parse_completion({**PROMPT, "response_format": {"type": "text"}})


def test_tool_checks_follow_vllm():
    error = refused(parse_chat, {**CHAT, "tool_choice": "auto"})
    assert error.message == "When using `tool_choice`, `tools` must be set." and error.param == "tool_choice"
    assert refused(parse_chat, {**CHAT, "tools": []}).message == "`tools` must not be an empty array."
    assert refused(parse_chat, {**CHAT, "tools": [{"type": "function"}]}).param == "tools[0].function"
    assert parse_chat({**CHAT, "tool_choice": "none"}).messages  # accepted by vLLM without tools


def test_supported_fields_are_parsed():
    chat = parse_chat({**CHAT, "chat_template_kwargs": {"enable_thinking": False}, "add_special_tokens": True,
                       "return_tokens_as_token_ids": True, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    assert chat.add_special_tokens is True and chat.is_token_id_text and chat.is_usage_continuous
    plain = parse_completion({**PROMPT, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert plain.add_special_tokens is None and not plain.is_usage_continuous  # vLLM: only with include_usage
    assert parse_completion({**PROMPT, "add_special_tokens": False}).add_special_tokens is False
    assert refused(parse_chat, {**CHAT, "chat_template_kwargs": {"messages": []}}).param == "chat_template_kwargs"
    assert refused(parse_chat, {**CHAT, "chat_template_kwargs": "x"}).param == "chat_template_kwargs"
    assert parse_stream_request({**CHAT, "chat_template_kwargs": {"a": 1}}).chat_template_kwargs == {"a": 1}


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("repetition_penalty", 0),
                                          ("presence_penalty", 3)])
def test_sampling_value_out_of_range_names_its_field(field, value):
    with pytest.raises(ApiError) as caught:
        parse_completion({**PROMPT, field: value}).sampling_params(3, 100)
    assert caught.value.status == 400 and caught.value.param == field


def builder(tokenizer, *, is_chat: bool, is_token_id_text: bool = False,
            num_logprobs: int | None = None) -> ResponseBuilder:
    return ResponseBuilder.new("m", is_chat=is_chat, is_token_id_text=is_token_id_text, num_logprobs=num_logprobs,
                               token_text=lambda t: tokenizer.decode([t], skip_special_tokens=False),
                               token_bytes=tokenizer.token_bytes)


def test_completion_top_logprobs_hold_the_sampled_token(tokenizer):
    a, b, c = (tokenizer.encode(x, add_special_tokens=False)[0] for x in ("a", "b", "c"))
    out = StreamOutput(1, a, "a", -0.5, ((b, -0.2), (c, -1.0)), "stop")
    made = builder(tokenizer, is_chat=False, num_logprobs=2)
    logprobs = made.complete_choices([made.choice([out], "stop")], {})["choices"][0]
    assert logprobs["logprobs"]["top_logprobs"] == [{"a": -0.5, "b": -0.2, "c": -1.0}]  # N + 1 entries
    only = StreamOutput(1, a, "a", -0.5, (), None)
    chunk = builder(tokenizer, is_chat=False, num_logprobs=0).chunk(only)
    assert chunk["choices"][0]["logprobs"]["top_logprobs"] == [{"a": -0.5}]  # logprobs: 0
    inside = StreamOutput(1, a, "a", -0.5, ((a, -0.5), (b, -2.0)), None)
    chunk = builder(tokenizer, is_chat=False, num_logprobs=1).chunk(inside)
    assert chunk["choices"][0]["logprobs"]["top_logprobs"] == [{"a": -0.5, "b": -2.0}]
    as_ids = builder(tokenizer, is_chat=False, is_token_id_text=True, num_logprobs=2).chunk(out)
    assert as_ids["choices"][0]["logprobs"]["tokens"] == [f"token_id:{a}"]
    assert as_ids["choices"][0]["logprobs"]["top_logprobs"] == [{f"token_id:{a}": -0.5, f"token_id:{b}": -0.2,
                                                                 f"token_id:{c}": -1.0}]


def test_every_choice_has_a_stop_reason(tokenizer):
    out = StreamOutput(1, 5, "x", finish_reason="stop")
    for is_chat in (False, True):
        made = builder(tokenizer, is_chat=is_chat)
        choice = made.choice([out], "stop", stop_reason="END")
        assert made.complete_choices([choice], {})["choices"][0]["stop_reason"] == "END"
        stopped = StreamOutput(1, 5, "x", finish_reason="stop", stop_reason=7)
        assert made.chunk(stopped)["choices"][0]["stop_reason"] == 7  # the output's own
        assert made.chunk(StreamOutput(1, 5, "x"))["choices"][0]["stop_reason"] is None
    assert builder(tokenizer, is_chat=True).role_chunk()["choices"][0]["stop_reason"] is None


def test_chat_logprob_bytes_are_each_tokens_own_bytes(tokenizer):
    """"é" is two byte-level tokens (0xC3, 0xA9): each one's bytes are its byte, not U+FFFD's three."""
    first, second = tokenizer.encode("é", add_special_tokens=False)
    out = StreamOutput(1, first, "", -0.1, ((second, -3.0),))
    item = builder(tokenizer, is_chat=True, num_logprobs=1).chunk(out)["choices"][0]["logprobs"]["content"][0]
    assert item["bytes"] == [0xC3] and item["top_logprobs"][0]["bytes"] == [0xA9]
    assert item["token"] == tokenizer.decode([first], skip_special_tokens=False)
    word = tokenizer.encode(" France", add_special_tokens=False)
    assert b"".join(tokenizer.token_bytes(t) for t in word) == b" France"
    assert tokenizer.token_bytes(EOS_TOKEN_ID) == EOS_TOKEN.encode()
