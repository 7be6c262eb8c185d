"""What one request's fields may cost the event loop every stream shares: n samples sort and check their logit_bias
once, a logit_bias larger than the vocabulary is refused before it is sorted, and a long prompt's echo is built and
serialized for its first stream chunk on a worker thread, as a whole response over as many tokens is.

An in-process app with a stand-in engine (``ScriptedLLM``: the synthetic tokenizer, played outputs)."""
from __future__ import annotations

import json
import threading

import pytest

from app_client import TOKEN_ID, ScriptedLLM, app_client
from fastdecode.actors import request as request_module
from fastdecode.actors.api import StreamOutput
from fastdecode.actors.frontend.generation import LARGE_RESPONSE_TOKENS
from fastdecode.actors.frontend.openai_response import ResponseBuilder
from fastdecode.actors.model.synthetic_tokenizer import CHAT_TEMPLATE
from fastdecode.actors.request import PromptLogprob
from synthetic_tokenizers import synthetic_tokenizer


class PromptScoringLLM(ScriptedLLM):
    """One token ("H", logprob -0.5) after the prompt's logprobs (-1 for each prompt token but the first, its top
    the token itself), in one output; a vocabulary of the synthetic tokenizer's size."""

    def __init__(self, max_model_len: int = 512) -> None:
        super().__init__()
        self.tokenizer = synthetic_tokenizer(chat_template=CHAT_TEMPLATE)
        self.max_model_len = max_model_len
        self.model_config.vocab_size = self.tokenizer.vocab_size

    def stream(self, prompt_ids: list[int], params):
        self.seeds.append(params.seed)
        return self._scored(prompt_ids)

    submit = stream

    async def _scored(self, prompt_ids: list[int]):
        scores = (None, *(PromptLogprob(-1.0, 1, ((t, -1.0),)) for t in prompt_ids[1:]))
        yield StreamOutput(1, TOKEN_ID, "H", -0.5, ((TOKEN_ID, -0.5),), "length", prompt_logprobs=scores)


@pytest.fixture
def bias_sizes_checked(monkeypatch) -> list[int]:
    """The size of every non-empty logit_bias that was sorted and checked (a LogitBias is taken as it is)."""
    sizes: list[int] = []
    of = request_module.LogitBias.of.__func__

    def counted(cls, value):
        if value and not isinstance(value, request_module.LogitBias):
            sizes.append(len(value))
        return of(cls, value)

    monkeypatch.setattr(request_module.LogitBias, "of", classmethod(counted))
    return sizes


async def test_n_seeded_samples_sort_and_check_their_logit_bias_once(bias_sizes_checked):
    llm = PromptScoringLLM()
    vocab_size = llm.model_config.vocab_size
    bias = {str(token_id): 1.0 for token_id in range(vocab_size)}  # the whole vocabulary: as many as can be
    async with app_client(llm) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "n": 4, "seed": 5, "logit_bias": bias})
        assert response.status == 200, await response.text()
        assert len((await response.json())["choices"]) == 4
    assert sorted(llm.seeds) == [5, 6, 7, 8]  # sample i seeded seed + i all the same
    assert bias_sizes_checked == [vocab_size]


async def test_many_prompts_share_one_sorted_and_checked_logit_bias(bias_sizes_checked):
    """A list of prompts with a large logit_bias: sorted and checked once, when the request is parsed (off the loop
    for a large body), not again for each prompt's parameters, which are built on the loop."""
    llm = PromptScoringLLM()
    vocab_size = llm.model_config.vocab_size
    bias = {str(token_id): 1.0 for token_id in range(vocab_size)}
    async with app_client(llm) as client:
        response = await client.post("/v1/completions", json={"prompt": [[TOKEN_ID]] * 5, "max_tokens": 1,
                                                               "seed": 1, "logit_bias": bias})
        assert response.status == 200, await response.text()
        assert len((await response.json())["choices"]) == 5
    assert bias_sizes_checked == [vocab_size]


@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
async def test_a_logit_bias_larger_than_the_vocabulary_is_refused_before_anything_is_built(bias_sizes_checked, route,
                                                                                      body):
    llm = PromptScoringLLM()
    vocab_size = llm.model_config.vocab_size
    bias = {str(token_id): 1.0 for token_id in range(vocab_size + 1)}
    async with app_client(llm) as client:
        response = await client.post(route, json={**body, "n": 2, "logit_bias": bias})
        error = (await response.json())["error"]
    assert (response.status, error["param"]) == (400, "logit_bias")
    assert f"{vocab_size + 1} entries" in error["message"] and f"{vocab_size}" in error["message"]
    # sorted once as it was parsed (off the loop: a body this large is), then refused before any prompt's parameters
    # were built or anything was submitted
    assert bias_sizes_checked == [vocab_size + 1] and llm.seeds == []


async def test_more_stop_token_ids_than_the_vocabulary_are_refused():
    """Each generated token is looked up among a request's stop_token_ids on the event loop: more than the vocabulary
    has repeat some, and are refused before anything is submitted."""
    llm = PromptScoringLLM()
    vocab_size = llm.model_config.vocab_size
    async with app_client(llm) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                               "stop_token_ids": [1] * (vocab_size + 1)})
        error = (await response.json())["error"]
        assert (response.status, error["param"]) == (400, "stop_token_ids")
        assert f"{vocab_size + 1} ids" in error["message"] and llm.seeds == []
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                               "stop_token_ids": [1] * vocab_size})
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("num_prompt_tokens, is_off_loop", [(3, False), (LARGE_RESPONSE_TOKENS + 1, True)],
                         ids=["short", "long"])
async def test_a_long_prompts_streamed_echo_is_built_off_the_loop(monkeypatch, num_prompt_tokens, is_off_loop):
    """The first chunk of an echo with logprobs covers every prompt token: over a long prompt, building and
    serializing it stalled the loop as a whole response over that many tokens did before it moved to a thread."""
    built_on: list[threading.Thread] = []
    chunk = ResponseBuilder.chunk

    def spied(self, out, **kwargs):
        if kwargs.get("echo_text") is not None:
            built_on.append(threading.current_thread())
        return chunk(self, out, **kwargs)

    monkeypatch.setattr(ResponseBuilder, "chunk", spied)
    llm = PromptScoringLLM(max_model_len=2 * LARGE_RESPONSE_TOKENS)
    async with app_client(llm) as client:
        response = await client.post("/v1/completions", json={"prompt": [TOKEN_ID] * num_prompt_tokens, "echo": True,
                                                               "logprobs": 1, "max_tokens": 1, "stream": True})
        assert response.status == 200, await response.text()
        events = [event.removeprefix("data: ") for event in (await response.text()).split("\n\n") if event]
    assert events[-1] == "[DONE]"
    (chunk_body,) = [json.loads(event) for event in events[:-1]]  # the one token's chunk, the prompt first
    (choice,) = chunk_body["choices"]
    assert choice["text"] == "H" * (num_prompt_tokens + 1)
    assert choice["logprobs"]["token_logprobs"] == [None, *[-1.0] * (num_prompt_tokens - 1), -0.5]
    assert len(built_on) == 1 and (built_on[0] is not threading.main_thread()) is is_off_loop
