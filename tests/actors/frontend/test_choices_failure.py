"""One choice of several failing mid-generation ends the whole request with its error, and no other choice is
left running.  A scripted engine stands in for the cluster (no model runs): the sample with seed ``FAILING_SEED``
fails after its first token, the others would decode for seconds; every stream records that it was closed."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from app_client import app_client
from fastdecode.actors.api import StreamOutput
from fastdecode.actors.model.config import SamplingDefaults
from fastdecode.actors.model.synthetic_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    NUM_TEXT_TOKENS,
    build_synthetic_tokenizer,
)
from fastdecode.actors.model.tokenizer import Tokenizer
from fastdecode.actors.request import SamplingParams

FAILING_SEED = 11  # seed 10 + sample 1
TOKEN_ID = 72


class ScriptedLLM:
    """What the routes use of an ``AsyncLLM``; ``stream`` plays a token every 10 ms."""

    def __init__(self) -> None:
        self.tokenizer = Tokenizer(build_synthetic_tokenizer(NUM_TEXT_TOKENS + 2), bos_token=BOS_TOKEN,
                                   eos_token=EOS_TOKEN)
        self.max_model_len, self.max_num_choices = 512, 8
        self.model_config = SimpleNamespace(sampling_defaults=SamplingDefaults())
        self.seeds: list[int | None] = []
        self.num_open = 0

    def stream(self, prompt_ids: list[int], params: SamplingParams):
        self.seeds.append(params.seed)
        return self._stream(params)

    submit = stream  # several choices are submitted at once (AsyncLLM.submit); nothing here refuses

    async def _stream(self, params: SamplingParams):
        self.num_open += 1
        try:
            for index in range(params.max_tokens):
                await asyncio.sleep(0.01)
                if params.seed == FAILING_SEED and index == 1:
                    yield StreamOutput(1, -1, "", finish_reason="error", error="the shard broke")
                    return
                yield StreamOutput(1, TOKEN_ID, "H", finish_reason="length" if index == params.max_tokens - 1 else None)
        finally:
            self.num_open -= 1


@pytest.fixture
async def client_and_llm():
    llm = ScriptedLLM()
    async with app_client(llm) as client:
        yield client, llm


BODY = {"prompt": [5, 6, 7], "n": 3, "seed": 10, "max_tokens": 300}


async def _until_closed(llm: ScriptedLLM) -> None:
    for _ in range(100):
        if llm.num_open == 0:
            return
        await asyncio.sleep(0.01)


async def test_one_failed_choice_fails_the_response_and_cancels_the_others(client_and_llm):
    client, llm = client_and_llm
    response = await client.post("/v1/completions", json=BODY)
    error = (await response.json())["error"]
    assert response.status == 500 and error["message"] == "the shard broke"
    assert llm.seeds == [10, 11, 12]  # sample i takes seed + i
    await _until_closed(llm)
    assert llm.num_open == 0  # the two healthy choices (300 tokens, 3 s) were cancelled at once


async def test_one_failed_choice_ends_the_stream_with_its_error(client_and_llm):
    client, llm = client_and_llm
    response = await client.post("/v1/completions", json={**BODY, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    lines = [line.strip() for line in (await response.text()).splitlines() if line.strip()]
    assert response.status == 200 and lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    errors = [line for line in lines if '"error"' in line]
    assert len(errors) == 1 and "the shard broke" in errors[0]
    assert lines.index(errors[0]) >= len(lines) - 3  # after it only the usage chunk and [DONE]
    await _until_closed(llm)
    assert llm.num_open == 0
