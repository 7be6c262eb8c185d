"""Request parsing without a server: fields, aliases and refusals."""
from __future__ import annotations

import pytest

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.openai_request import (
    decode_body,
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
    assert request.messages == ({"role": "user", "content": "ab"},)
    assert request.num_logprobs == 0
    assert request.sampling_params(num_prompt_tokens=10, max_model_len=100).max_tokens == 5
    unlimited = parse_chat({"messages": [{"role": "user", "content": "a"}]})
    assert unlimited.sampling_params(num_prompt_tokens=10, max_model_len=100).max_tokens == 90


def test_completion_default_max_tokens_is_16():
    assert parse_completion({"prompt": [1, 2]}).sampling_params(2, 100).max_tokens == 16


@pytest.mark.parametrize("body", [
    {"prompt": "a", "n": 2}, {"prompt": "a", "best_of": 3}, {"prompt": "a", "echo": True},
    {"prompt": "a", "logit_bias": {"1": 5}}, {"prompt": True}, {"prompt": [1, True]}, {"prompt": "a", "seed": 1.5},
    {"prompt": "a", "ignore_eos": 1}, {"prompt": "a", "temperature": float("nan")},
])
def test_completion_refusals(body):
    with pytest.raises(ApiError) as refused:
        parse_completion(body)
    assert refused.value.status == 400


def test_stream_request_needs_exactly_one_prompt_kind():
    assert parse_stream_request({"prompt": [1, 2]}).prompt == (1, 2)
    for body in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}):
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
