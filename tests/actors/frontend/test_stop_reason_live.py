"""``stop_reason`` and continuous usage on the live tiny server, streamed and not, and on the WebSocket."""
from __future__ import annotations

import json

import aiohttp
from websockets.asyncio.client import connect

from conftest import API_KEY
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The capital of France is"


async def test_stop_token_id_is_the_stop_reason_streamed_and_not(tiny_server, tiny_model):
    model, tokenizer = tiny_model
    expected = reference_generate(model, tokenizer, tokenizer.encode(PROMPT),
                                  SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stop_id = expected.token_ids[2]
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stop_token_ids": [stop_id]}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(tiny_server.url + "/v1/completions", json=body) as response:
            choice = (await response.json())["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id
        async with session.post(tiny_server.url + "/v1/completions", json={**body, "max_tokens": 2}) as response:
            choice = (await response.json())["choices"][0]
        assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True,
                                                                  "continuous_usage_stats": True}}
        async with session.post(tiny_server.url + "/v1/completions", json=stream_body) as response:
            chunks = [json.loads(line[6:]) async for line in _data_lines(response)]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[-1]["stop_reason"] == stop_id and all(c["stop_reason"] is None for c in choices[:-1])
    assert all("usage" in c for c in chunks)  # continuous usage: every chunk
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_the_stop_string_that_matched_is_the_stop_reason(tiny_server, tiny_model):
    model, tokenizer = tiny_model
    expected = reference_generate(model, tokenizer, tokenizer.encode(PROMPT),
                                  SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    pieces = [tokenizer.decode([t]) for t in expected.token_ids]
    first, later = pieces[2] + pieces[3], pieces[9]
    assert expected.text.index(first) < expected.text.index(later)  # the one listed last matches first
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [later, first]}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(tiny_server.url + "/v1/completions", json=body) as response:
            choice = (await response.json())["choices"][0]
        async with session.post(tiny_server.url + "/v1/completions", json={**body, "stream": True}) as response:
            chunks = [json.loads(line[6:]) async for line in _data_lines(response)]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", first)
    assert choice["text"] == expected.text[:expected.text.index(first)]
    assert chunks[-1]["choices"][0]["stop_reason"] == first
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


async def test_websocket_done_carries_the_stop_reason(tiny_server, tiny_model):
    model, tokenizer = tiny_model
    expected = reference_generate(model, tokenizer, tokenizer.encode(PROMPT),
                                  SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stop_id = expected.token_ids[2]
    async with connect(tiny_server.ws_url, additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                  "stop_token_ids": [stop_id]}))
        done = [json.loads(raw) async for raw in ws][-1]
    assert (done["type"], done["finish_reason"], done["stop_reason"]) == ("done", "stop", stop_id)
    assert done["usage"]["completion_tokens"] == 3


async def _data_lines(response: aiohttp.ClientResponse):
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            yield line
