from __future__ import annotations

import pytest

from fastdecode.actors.request import RequestError, SamplingParams


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": "1"}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": ("",)}, "stop"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_a_bad_field_names_itself(fields, param):
    with pytest.raises(RequestError) as info:
        SamplingParams(**fields)
    assert info.value.param == param
    assert str(info.value).startswith(param)


def test_request_error_without_a_field():
    error = RequestError("the prompt is too long")
    assert error.param is None and str(error) == "the prompt is too long"
