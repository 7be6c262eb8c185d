"""Several choices per request on the live tiny server: a completions list of prompts and ``n`` > 1 (vLLM's
numbering, usage and seeds), streamed and not, and a client that leaves frees every choice's KV."""
from __future__ import annotations

import asyncio
import json

import aiohttp

from conftest import API_KEY
from metrics_scrape import ABORTED, is_freed, scrape, until_aborted_and_freed

AUTH = {"Authorization": f"Bearer {API_KEY}"}
STEPS = ("fastdecode_steps_total", ())  # engine steps since start: the server is idle between tests
LONG = 200  # tokens a choice would decode if it were not cancelled
PROMPTS = ["The capital of France is", [318, 72, 101, 302, 111]]  # text and token ids
SAMPLED = {"max_tokens": 6, "temperature": 1.0, "ignore_eos": True}


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as response:
        payload = await response.json()
        assert response.status == 200, payload
        return payload


async def sse(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[list[dict], int]:
    """The JSON events of a stream, and how many ``[DONE]`` lines ended it."""
    events, num_done = [], 0
    async with session.post(url, json=body) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                num_done += 1
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events, num_done


def assembled(events: list[dict], *, key: str = "text") -> dict[int, dict]:
    """Each choice's text, finish and stop reasons put together from stream chunks."""
    choices: dict[int, dict] = {}
    for event in events:
        for choice in event["choices"]:
            into = choices.setdefault(choice["index"], {"text": "", "finish_reason": None, "stop_reason": None})
            piece = choice["delta"].get("content", "") if key == "delta" else choice["text"]
            into["text"] += piece or ""
            if choice["finish_reason"] is not None:
                into["finish_reason"], into["stop_reason"] = choice["finish_reason"], choice["stop_reason"]
    return choices


async def test_prompts_times_n_choices_with_seeds_usage_and_streaming(tiny_server):
    url = tiny_server.url + "/v1/completions"
    body = {"prompt": PROMPTS, "n": 2, "seed": 7, **SAMPLED}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        whole = await post(session, url, body)
        singles = {}  # choice index -> the single request with that prompt and seed + sample index
        for prompt_index, prompt in enumerate(PROMPTS):
            for sample in range(2):
                single = await post(session, url, {**SAMPLED, "prompt": prompt, "seed": 7 + sample})
                singles[prompt_index * 2 + sample] = single
        events, num_done = await sse(session, url, {**body, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    choices = whole["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for choice in choices:
        assert choice["text"] == singles[choice["index"]]["choices"][0]["text"]
        assert choice["finish_reason"] == "length"
    assert choices[0]["text"] != choices[1]["text"]  # two seeds, two samples
    prompt_tokens = [singles[0]["usage"]["prompt_tokens"], singles[2]["usage"]["prompt_tokens"]]
    assert whole["usage"] == {"prompt_tokens": sum(prompt_tokens), "completion_tokens": 4 * 6,
                              "total_tokens": sum(prompt_tokens) + 24}  # each prompt counted once
    # streamed: every chunk one choice with its index, then one usage chunk and one [DONE]
    usage_events = [e for e in events if not e["choices"]]
    assert num_done == 1 and len(usage_events) == 1 and events[-1] is usage_events[0]
    assert usage_events[0]["usage"] == whole["usage"]
    assert all(len(e["choices"]) == 1 for e in events[:-1])
    streamed = assembled(events)
    assert streamed == {c["index"]: {k: c[k] for k in ("text", "finish_reason", "stop_reason")} for c in choices}


async def test_chat_n_greedy_gives_identical_choices(tiny_server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "n": 3, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        url = tiny_server.url + "/v1/chat/completions"
        whole = await post(session, url, body)
        single = await post(session, url, {**body, "n": 1})
        events, num_done = await sse(session, url, {**body, "stream": True})
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert texts == [single["choices"][0]["message"]["content"]] * 3
    assert whole["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]  # one prompt, counted once
    assert whole["usage"]["completion_tokens"] == 15
    roles = [e["choices"][0]["index"] for e in events if e["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1, 2] and num_done == 1
    assert {i: c["text"] for i, c in assembled(events, key="delta").items()} == dict(enumerate(texts))


async def test_a_client_that_leaves_frees_every_choice(tiny_server):
    before = await scrape(tiny_server.url)
    num_aborted = before.get(ABORTED, 0)
    body = {"prompt": ["Hello", "Bonjour"], "n": 2, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(tiny_server.url + "/v1/completions", json=body) as response:
            seen: set[int] = set()
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    seen.add(json.loads(line[6:])["choices"][0]["index"])
                if len(seen) == 4:
                    break  # every choice is decoding: leave
    assert seen == {0, 1, 2, 3}

    after = await until_aborted_and_freed(tiny_server.url, num_aborted + 4)
    assert after.get(ABORTED, 0) == num_aborted + 4
    assert is_freed(after)
    assert after[STEPS] - before[STEPS] < LONG / 2  # no choice decoded on to its end


async def test_a_refused_prompt_in_a_batch_cancels_the_submitted_ones(tiny_server):
    before = await scrape(tiny_server.url)
    body = {"prompt": ["Hello", [1, 10**9]], "n": 2, "max_tokens": LONG, "ignore_eos": True}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(tiny_server.url + "/v1/completions", json=body) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "prompt"
    await asyncio.sleep(0.2)  # a choice left running would go on stepping
    after = await until_aborted_and_freed(tiny_server.url, before.get(ABORTED, 0))
    assert is_freed(after)
    assert after[STEPS] - before[STEPS] < LONG / 2, "the admitted choices of the refused request decoded on"
