"""reference_generate's stopping rules and request checks (on random:tiny)."""
from __future__ import annotations

import pytest

from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import RequestError, SamplingParams

PROMPT = [318, 84, 257, 312]  # "<|bos|>The capital"


def _greedy(tiny_model, **kwargs):
    model, tokenizer = tiny_model
    return reference_generate(model, tokenizer, PROMPT, SamplingParams(temperature=0.0, **kwargs))


def test_max_tokens_is_length(tiny_model):
    result = _greedy(tiny_model, max_tokens=12, ignore_eos=True)
    assert len(result.token_ids) == 12 and result.finish_reason == "length"
    assert result.prompt_token_ids == PROMPT
    assert result.text == tiny_model[1].decode(result.token_ids)


def test_stop_token_id_ends_with_stop(tiny_model):
    free = _greedy(tiny_model, max_tokens=12, ignore_eos=True).token_ids
    stop_id = free[5]
    first = free.index(stop_id)
    result = _greedy(tiny_model, max_tokens=12, ignore_eos=True, stop_token_ids=(stop_id,))
    assert result.token_ids == free[: first + 1] and result.finish_reason == "stop"


def test_eos_stops_unless_ignored(tiny_model):
    model, tokenizer = tiny_model
    free = _greedy(tiny_model, max_tokens=12, ignore_eos=True).token_ids
    tokenizer_eos = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = (free[3],)  # pretend the 4th token is the EOS
    try:
        stopped = _greedy(tiny_model, max_tokens=12)
        ignored = _greedy(tiny_model, max_tokens=12, ignore_eos=True)
    finally:
        tokenizer.eos_token_ids = tokenizer_eos
    assert stopped.token_ids == free[: free.index(free[3]) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == free


def test_stop_string_truncates_text(tiny_model):
    free = _greedy(tiny_model, max_tokens=20, ignore_eos=True)
    stop = free.text[6:9]
    assert len(stop) == 3
    result = _greedy(tiny_model, max_tokens=20, ignore_eos=True, stop=(stop,))
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(stop)]
    assert len(result.token_ids) < 20


def test_stop_string_waits_for_min_tokens(tiny_model):
    """The text of the first min_tokens tokens is not searched for stop strings (vLLM)."""
    free = _greedy(tiny_model, max_tokens=12, ignore_eos=True)
    assert free.text.startswith("}}}") and len(free.token_ids) == 12
    result = _greedy(tiny_model, max_tokens=12, ignore_eos=True, min_tokens=2, stop=("}",))
    assert result.token_ids == free.token_ids[:3] and result.text == "}}" and result.finish_reason == "stop"


def test_context_end_is_length(tiny_model):
    model, tokenizer = tiny_model
    context = model.config.max_position_embeddings
    prompt = [100 + i % 50 for i in range(context - 3)]
    result = reference_generate(model, tokenizer, prompt, SamplingParams(temperature=0.0, max_tokens=50,
                                                                         ignore_eos=True))
    assert len(result.token_ids) == 3 and result.finish_reason == "length"


@pytest.mark.parametrize(
    "prompt, message",
    [([], "empty"), ([5, 99999], "outside the vocabulary"), ([7] * 2048, "context is 2048")],
)
def test_bad_prompts_are_request_errors(tiny_model, prompt, message):
    model, tokenizer = tiny_model
    with pytest.raises(RequestError, match=message):
        reference_generate(model, tokenizer, prompt, SamplingParams())


def test_seeded_sampling_is_reproducible_with_logprobs(tiny_model):
    model, tokenizer = tiny_model
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=10, ignore_eos=True, logprobs=0)
    first = reference_generate(model, tokenizer, PROMPT, params)
    again = reference_generate(model, tokenizer, PROMPT, params)
    other = reference_generate(model, tokenizer, PROMPT, SamplingParams(temperature=1.0, seed=43, max_tokens=10,
                                                                        ignore_eos=True))
    assert first.token_ids == again.token_ids and first.token_ids != other.token_ids
    assert len(first.logprobs) == 10 and all(lp <= 0.0 for lp in first.logprobs)
