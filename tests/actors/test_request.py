from __future__ import annotations

import pytest

from fastdecode.actors.request import GenerationResult, Logprob, RequestError, SamplingParams


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
    ({"logprobs": -2}, "logprobs"),
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


@pytest.mark.parametrize("stop, expected", [
    ("END", ("END",)),  # a str is one stop string (vLLM's ``stop: str | list[str]``), not its characters
    (["a", "bc"], ("a", "bc")),
    (("a",), ("a",)),
    (None, ()),
])
def test_stop_is_one_string_or_a_list(stop, expected):
    params = SamplingParams(stop=stop)
    assert params.stop == expected and isinstance(params.stop, tuple)
    hash(params)  # stays hashable: lists are stored as tuples


def test_stop_token_ids_list_is_stored_as_tuple():
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


@pytest.mark.parametrize("fields, param", [
    ({"stop": 5}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": b"x"}, "stop"),
    ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"top_k": -5}, "top_k"),
    ({"top_k": -2}, "top_k"),
])
def test_bad_stop_or_top_k_names_itself(fields, param):
    with pytest.raises(RequestError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


@pytest.mark.parametrize("top_k", [-1, 0, 1, 50])
def test_top_k_disabled_or_positive_is_accepted(top_k):
    assert SamplingParams(top_k=top_k).top_k == top_k


def test_generation_result_reads_as_vllm_request_output():
    positions = [{5: Logprob(-0.5, 1, "h")}, {6: Logprob(-1.0, 2, "i"), 9: Logprob(-0.7, 1, "!")}]
    result = GenerationResult(prompt_token_ids=[1, 2], token_ids=[5, 6], text="hi", finish_reason="length",
                              logprobs=[-0.5, -1.0], prompt="ab", position_logprobs=positions)
    (completion,) = result.outputs
    assert (result.prompt, result.prompt_token_ids, result.finished) == ("ab", [1, 2], True)
    assert (completion.index, completion.text, completion.finish_reason) == (0, "hi", "length")
    assert completion.token_ids is result.token_ids and completion.logprobs is positions  # a view
    assert completion.cumulative_logprob == -1.5
    result.text += "!"
    result.token_ids.append(7)
    assert completion.text == "hi!" and completion.token_ids == [5, 6, 7]
    with pytest.raises(AttributeError):
        completion.text = "changed"  # read-only


def test_completion_without_logprobs_has_none():
    result = GenerationResult(prompt_token_ids=[1])
    assert result.outputs[0].logprobs is None and not result.finished and result.prompt is None


def test_cumulative_logprob_is_the_sum_where_logprobs_were_asked_for():
    asked = GenerationResult(prompt_token_ids=[1], token_ids=[5, 6], logprobs=[-0.5, -1.0], num_logprobs=2)
    assert asked.outputs[0].cumulative_logprob == -1.5
    assert "cumulative_logprob=-1.5" in repr(asked.outputs[0])
    # asked with logprobs=0, nothing generated yet: 0.0 (vLLM starts at 0.0), not None
    assert GenerationResult(prompt_token_ids=[1], num_logprobs=0).outputs[0].cumulative_logprob == 0.0
    not_asked = GenerationResult(prompt_token_ids=[1], token_ids=[5])
    assert not_asked.outputs[0].cumulative_logprob is None


def test_request_output_fields_vllm_code_reads():
    result = GenerationResult(prompt_token_ids=[1], request_id="7")
    assert (result.request_id, result.prompt_logprobs) == ("7", None)


def test_with_seed_changes_the_seed_alone_without_checking_the_logit_bias_again(monkeypatch):
    """n samples of one request differ only in their seeds: a logit_bias over much of the vocabulary took a tenth
    of a second to sort and check again for each of them, on the server's event loop."""
    from fastdecode.actors import request as request_module

    params = SamplingParams(temperature=0.5, seed=7, logit_bias={9: 1.0, 2: -3.0}, stop=["x"])
    num_checked = []
    bias_pairs = request_module._bias_pairs
    monkeypatch.setattr(request_module, "_bias_pairs", lambda value: num_checked.append(1) or bias_pairs(value))
    seeded = params.with_seed(8)
    assert not num_checked
    assert seeded.seed == 8 and params.seed == 7
    assert seeded == SamplingParams(temperature=0.5, seed=8, logit_bias={9: 1.0, 2: -3.0}, stop=["x"])
    assert seeded.logit_bias is params.logit_bias
    for seed in ("8", True, 1.5):
        with pytest.raises(RequestError) as info:
            params.with_seed(seed)
        assert info.value.param == "seed"
