"""Request parsing without a server: fields, aliases and refusals."""
from __future__ import annotations

import json
import threading

import pytest

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.body_fields import MAX_STOP_CHARS, MAX_STOP_STRINGS
from fastdecode.actors.frontend.openai_request import (
    LARGE_BODY_BYTES,
    decode_body,
    parse_body,
    parse_chat,
    parse_completion,
    parse_stream_request,
)


def test_completion_fields_reach_sampling_params():
    request = parse_completion({
        "prompt": ["Hello"], "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "seed": 3,
        "stop": "x", "logprobs": 2, "min_tokens": 1, "ignore_eos": True, "repetition_penalty": 1.1,
        "stream": True, "stream_options": {"include_usage": True},
    })
    assert request.prompt == "Hello" and request.is_stream and request.is_usage_streamed
    params = request.sampling_params(num_prompt_tokens=3, max_model_len=100)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (9, 0.5, 0.9, 7, 3)
    assert params.stop == ("x",) and params.logprobs == 2 and params.ignore_eos and params.min_tokens == 1


def test_chat_defaults_and_aliases():
    request = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
                          "max_completion_tokens": 5, "logprobs": True})
    assert request.messages == ({"role": "user", "content": "a\nb"},)  # text parts joined as vLLM joins them
    assert request.num_logprobs == 0
    assert request.sampling_params(num_prompt_tokens=10, max_model_len=100).max_tokens == 5
    unlimited = parse_chat({"messages": [{"role": "user", "content": "a"}]})
    assert unlimited.sampling_params(num_prompt_tokens=10, max_model_len=100).max_tokens == 90


def test_completion_default_max_tokens_is_16():
    assert parse_completion({"prompt": [1, 2]}).sampling_params(2, 100).max_tokens == 16


@pytest.mark.parametrize("body", [
    {"prompt": "a", "n": 0}, {"prompt": "a", "best_of": 3}, {"prompt": "a", "n": 2, "best_of": 1},
    {"prompt": "a", "max_tokens": 0}, {"prompt": "a", "prompt_logprobs": -2},
    {"prompt": "a", "logit_bias": {"x": 5}}, {"prompt": True}, {"prompt": [1, True]}, {"prompt": "a", "seed": 1.5},
    {"prompt": "a", "ignore_eos": 1}, {"prompt": "a", "temperature": float("nan")},
])
def test_completion_refusals(body):
    with pytest.raises(ApiError) as refused:
        parse_completion(body)
    assert refused.value.status == 400


def test_echo_with_logprobs_asks_for_the_prompts_logprobs():
    """vLLM's: an echo's prompt logprobs are as many as its logprobs, unless prompt_logprobs says; no echo, none."""
    def prompt_logprobs(body):
        return parse_completion({"prompt": [1, 2], **body}).sampling_params(2, 100).prompt_logprobs

    assert prompt_logprobs({"echo": True, "logprobs": 3, "max_tokens": 0}) == 3
    assert prompt_logprobs({"echo": True, "logprobs": 3, "prompt_logprobs": 1, "stream": False}) == 1
    assert prompt_logprobs({"echo": True, "logprobs": 0, "stream": True}) == 0  # a stream echoes them too
    assert prompt_logprobs({"logprobs": 3}) is None and prompt_logprobs({"echo": True}) is None
    assert prompt_logprobs({"prompt_logprobs": 2}) == 2
    chat = parse_chat({"messages": CHAT, "prompt_logprobs": 4})
    assert chat.sampling_params(2, 100).prompt_logprobs == 4


@pytest.mark.parametrize("parse", [
    lambda b: parse_completion({"prompt": "a", **b}), lambda b: parse_chat({"messages": CHAT, **b}),
    lambda b: parse_stream_request({"prompt": "a", **b}),
], ids=["completions", "chat", "websocket"])
def test_prompt_logprobs_are_refused_on_a_stream(parse):
    with pytest.raises(ApiError) as refused:
        parse({"prompt_logprobs": 1, "stream": True})
    assert (refused.value.status, refused.value.param) == (400, "prompt_logprobs")
    assert "stream" in refused.value.message


def test_stream_request_needs_exactly_one_prompt_kind():
    assert parse_stream_request({"prompt": [1, 2]}).prompt == (1, 2)
    # a batch of one prompt is that prompt, as /v1/completions takes it
    assert parse_stream_request({"prompt": ["Hello"]}).prompt == "Hello"
    assert parse_stream_request({"prompt": [[1, 2, 3]]}).prompt == (1, 2, 3)
    for body in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {"prompt": ["a", "b"]}):
        with pytest.raises(ApiError):
            parse_stream_request(body)


def test_context_overflow_is_a_400_with_a_code():
    request = parse_completion({"prompt": "a", "max_tokens": 50})
    with pytest.raises(ApiError) as refused:
        request.sampling_params(num_prompt_tokens=60, max_model_len=100)
    assert refused.value.code == "context_length_exceeded" and "100" in refused.value.message


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff", b"3", b"null"])
def test_decode_body_refuses_non_objects(raw):
    with pytest.raises(ApiError):
        decode_body(raw)


HUGE_INT = 10**400  # past the float range: math.isfinite raised OverflowError on it


FLOAT_FIELDS = ["temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
INTEGER_FIELDS = ["top_k", "min_tokens", "seed", "max_tokens", "logprobs"]


@pytest.mark.parametrize("name", FLOAT_FIELDS + INTEGER_FIELDS)
@pytest.mark.parametrize("value", [HUGE_INT, -HUGE_INT, 2**63, -2**63 - 1, 1e308])
def test_out_of_range_numbers_are_a_400(name, value):
    body = decode_body(json.dumps({"prompt": "x", name: value}))
    for parse in (parse_completion, parse_stream_request):
        with pytest.raises(ApiError) as refused:
            parse(body).sampling_params(num_prompt_tokens=1, max_model_len=100)
        assert refused.value.status == 400
        if name in INTEGER_FIELDS or abs(value) > 1e308:  # else a float in range: SamplingParams says why
            assert refused.value.param == name, refused.value.message
        assert len(refused.value.message) < 200, "the message must not echo hundreds of digits"


def test_chat_numbers_past_the_float_range_are_a_400():
    with pytest.raises(ApiError) as refused:
        parse_chat({"messages": [{"role": "user", "content": "a"}], "top_p": -HUGE_INT})
    assert (refused.value.status, refused.value.param) == (400, "top_p")


def test_int64_bounds_are_accepted_for_the_seed():
    for seed in (2**63 - 1, -2**63):
        assert parse_completion({"prompt": "x", "seed": seed}).sampling_params(1, 100).seed == seed


UNSUPPORTED = [
    ("guided_decoding_backend", "outlines"), ("use_beam_search", True), ("continue_final_message", True),
]
HARMLESS = [
    ("min_p", 0), ("min_p", 0.0), ("min_p", None), ("guided_json", None), ("prompt_logprobs", None),
    ("use_beam_search", False), ("bad_words", []), ("allowed_token_ids", None), ("truncate_prompt_tokens", None),
    ("include_stop_str_in_output", False), ("continue_final_message", False), ("skip_special_tokens", True),
    ("logit_bias", {}), ("add_generation_prompt", True),
]
CHAT = [{"role": "user", "content": "a"}]


@pytest.mark.parametrize(("name", "value"), UNSUPPORTED + [("add_generation_prompt", False)])
def test_fields_that_would_change_the_output_are_refused_not_ignored(name, value):
    parsers = [lambda b: parse_chat({"messages": CHAT, **b}), lambda b: parse_stream_request({"messages": CHAT, **b})]
    if name != "add_generation_prompt":  # a chat field: completions have no template to apply
        parsers += [lambda b: parse_completion({"prompt": "a", **b}),
                    lambda b: parse_stream_request({"prompt": "a", **b})]
    for parse in parsers:
        with pytest.raises(ApiError) as refused:
            parse({name: value})
        assert (refused.value.status, refused.value.param) == (400, name)
        assert refused.value.message == f"{name} is not supported"


@pytest.mark.parametrize(("name", "value"), HARMLESS)
def test_default_values_of_unsupported_fields_are_accepted(name, value):
    assert parse_chat({"messages": CHAT, name: value}).messages == tuple(CHAT)
    assert parse_completion({"prompt": "a", name: value}).prompt == "a"


def test_add_generation_prompt_is_a_chat_field_only():
    assert parse_completion({"prompt": "a", "add_generation_prompt": False}).prompt == "a"


def test_a_list_of_prompts_and_n_choices():
    batch = parse_completion({"prompt": ["a", [5, 6]], "n": 3, "best_of": 3, "seed": 40, "temperature": 0.5})
    assert (batch.prompt, batch.prompts, batch.num_prompts, batch.num_samples) == (None, ("a", (5, 6)), 2, 3)
    assert [one.prompt for one in batch.per_prompt()] == ["a", (5, 6)]
    assert [params.seed for params in batch.samples_params(2, 100)] == [40, 41, 42]
    assert parse_completion({"prompt": ["a"]}).per_prompt()[0].prompt == "a"  # a batch of one is one prompt
    assert parse_completion({"prompt": [[5, 6]]}).prompt == (5, 6)
    unseeded = parse_completion({"prompt": "a", "n": 2})
    assert [params.seed for params in unseeded.samples_params(2, 100)] == [None, None] and unseeded.num_prompts == 1
    assert parse_chat({"messages": [{"role": "user", "content": "a"}], "n": 4}).num_samples == 4
    with pytest.raises(ApiError) as refused:
        parse_stream_request({"prompt": "a", "n": 2})
    assert refused.value.param == "n"


def test_text_that_is_no_unicode_is_a_400_naming_it():
    """JSON's "\\ud800" is a lone surrogate: the tokenizer failed on it with a 500."""
    with pytest.raises(ApiError) as info:
        parse_chat({"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}]})
    assert info.value.status == 400 and info.value.param == "messages[1].content"
    with pytest.raises(ApiError) as info:
        parse_completion({"prompt": "a\udfffb"})
    assert info.value.status == 400 and info.value.param == "prompt"


async def test_a_large_body_is_decoded_and_checked_off_the_event_loop():
    threads = []

    def parse(body):
        threads.append(threading.current_thread())
        return parse_completion(body)

    small = json.dumps({"prompt": "hi"})
    large = json.dumps({"prompt": [[1, 2]] * (LARGE_BODY_BYTES // 6)})
    assert (await parse_body(small, parse)).prompt == "hi"
    assert len((await parse_body(large, parse)).prompts) == LARGE_BODY_BYTES // 6
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()
    with pytest.raises(ApiError, match="nested too deeply"):
        await parse_body('{"a": ' * 100000 + "1" + "}" * 100000, parse)


PARSERS = [lambda b: parse_completion({"prompt": "a", **b}), lambda b: parse_chat({"messages": CHAT, **b}),
           lambda b: parse_stream_request({"prompt": "a", **b})]


@pytest.mark.parametrize("parse", PARSERS, ids=["completions", "chat", "websocket"])
def test_stop_strings_are_limited_in_number_and_length(parse):
    """Every stop string is searched for at every token, on the event loop: 100k of them took 83 ms a token."""
    most = ["s"] * MAX_STOP_STRINGS
    assert parse({"stop": most}).sampling["stop"] == tuple(most)
    longest = ["a" * (MAX_STOP_CHARS // 2), "b" * (MAX_STOP_CHARS - MAX_STOP_CHARS // 2)]
    assert parse({"stop": longest}).sampling["stop"] == tuple(longest)
    for stop, fragment in ([*most, "s"], f"at most {MAX_STOP_STRINGS} stop strings"), \
                          ([*longest[:-1], longest[-1] + "b"], f"at most {MAX_STOP_CHARS} characters"), \
                          ("c" * (MAX_STOP_CHARS + 1), f"at most {MAX_STOP_CHARS} characters"):
        with pytest.raises(ApiError) as refused:
            parse({"stop": stop})
        assert (refused.value.status, refused.value.param) == (400, "stop")
        assert fragment in refused.value.message


def test_samples_params_checks_the_logit_bias_once(monkeypatch):
    from fastdecode.actors import request as request_module

    biases_checked = []
    of = request_module.LogitBias.of.__func__

    def counted(cls, value):
        if value and not isinstance(value, cls):
            biases_checked.append(value)
        return of(cls, value)

    monkeypatch.setattr(request_module.LogitBias, "of", classmethod(counted))
    request = parse_completion({"prompt": "a", "n": 5, "seed": 3, "logit_bias": {"4": 2, "1": -1}})
    samples = request.samples_params(2, 100)
    assert [params.seed for params in samples] == [3, 4, 5, 6, 7]
    assert all(params.logit_bias == ((1, -1.0), (4, 2.0)) for params in samples)
    assert biases_checked == [{4: 2, 1: -1}]  # when parsed, and not again


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "suffix": "b"}, "suffix"),
    ({"prompt": "a", "echo": True}, "echo"),  # no place for the prompt's text in the token messages
    ({"prompt": "a", "echo": 1}, "echo"),
    ({"prompt": "a", "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": CHAT, "response_format": {"type": "structural_tag"}}, "response_format"),
    ({"messages": CHAT, "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"messages": CHAT, "tools": []}, "tools"),
    ({"messages": CHAT, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_the_stream_request_refuses_what_the_http_routes_refuse(body, param):
    """The WebSocket took these silently: a json_object format, tool calls, a suffix and an echo were ignored."""
    with pytest.raises(ApiError) as refused:
        parse_stream_request(body)
    assert (refused.value.status, refused.value.param) == (400, param)
    if param not in ("echo", "max_completion_tokens"):  # completions honour echo; chat says max_completion_tokens
        http_parse = parse_completion if "prompt" in body else parse_chat
        with pytest.raises(ApiError) as http_refused:
            http_parse(body)
        assert http_refused.value.message == refused.value.message


def test_the_stream_request_takes_chat_fields_as_the_chat_route_does():
    chat = {"messages": CHAT, "max_completion_tokens": 5, "max_tokens": 9, "tools": TOOLS, "tool_choice": "none",
            "response_format": {"type": "text"}}
    request = parse_stream_request(chat)
    assert request.max_tokens == parse_chat(chat).max_tokens == 5  # OpenAI's newer name wins, as on the chat route
    assert request.chat_template_kwargs == parse_chat(chat).chat_template_kwargs == {"tools": TOOLS}
    assert parse_stream_request({"messages": CHAT, "max_tokens": 9}).max_tokens == 9
    # a prompt has no template: tools are not a completions field, as /v1/completions leaves them alone
    prompt = parse_stream_request({"prompt": "a", "max_tokens": 4, "echo": False, "suffix": None, "tools": TOOLS})
    assert (prompt.max_tokens, prompt.is_echo, prompt.chat_template_kwargs) == (4, False, {})


@pytest.mark.parametrize("parse", [lambda b: parse_completion({"prompt": "a", **b}),
                                   lambda b: parse_chat({"messages": CHAT, **b})], ids=["completions", "chat"])
def test_user_is_taken_as_a_string_only(parse):
    parse({"user": "alice"})
    parse({"user": None})
    with pytest.raises(ApiError) as info:
        parse({"user": 5})
    assert info.value.status == 400 and info.value.param == "user" and "user must be a string" in str(info.value)
