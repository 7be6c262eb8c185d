"""reference_generate runs its SamplingParams as an engine request does (``SamplingParams.within``): one sample, and
max_tokens None up to the end of the context (on random:tiny)."""
from __future__ import annotations

import pytest

from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import RequestError, SamplingParams

PROMPT = [318, 84, 257, 312]  # "<|bos|>The capital"


def test_n_samples_are_refused_as_the_engine_refuses_them(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(RequestError, match="n=2") as info:
        reference_generate(model, tokenizer, PROMPT, SamplingParams(n=2))
    assert info.value.param == "n"


def test_no_max_tokens_runs_to_the_end_of_the_context(tiny_model):
    model, tokenizer = tiny_model
    context = model.config.max_position_embeddings
    prompt = [100 + i % 50 for i in range(context - 3)]
    result = reference_generate(model, tokenizer, prompt, SamplingParams(temperature=0.0, max_tokens=None,
                                                                         ignore_eos=True))
    assert len(result.token_ids) == 3 and result.finish_reason == "length"
