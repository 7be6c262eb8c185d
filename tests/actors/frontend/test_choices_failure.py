"""One choice of several failing mid-generation ends the whole request with its error, and no other choice is
left running.  A scripted engine stands in for the cluster (no model runs): the sample with seed ``FAILING_SEED``
fails after its first token, the others would decode for seconds; every stream records that it was closed."""
from __future__ import annotations

import asyncio

import pytest

from app_client import ScriptedLLM, app_client

FAILING_SEED = 11  # seed 10 + sample 1


@pytest.fixture
async def client_and_llm():
    llm = ScriptedLLM(failing_seed=FAILING_SEED)
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
    assert lines.index(errors[0]) == len(lines) - 2  # after it only [DONE]: no usage chunk (as vLLM)
    assert not any('"usage"' in line for line in lines)
    await _until_closed(llm)
    assert llm.num_open == 0
