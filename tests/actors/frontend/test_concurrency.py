"""64 concurrent streaming requests with varied sampling, against the same requests run alone."""
from __future__ import annotations

import asyncio
import random

NUM_REQUESTS = 64
WORDS = "the capital of France is a city and an island in the river where people sit and talk".split()


def varied_requests(seed: int) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for index in range(NUM_REQUESTS):
        kind = index % 4
        body = {"max_tokens": rng.randint(4, 40), "ignore_eos": True, "stream": True}
        if kind == 0:
            body["temperature"] = 0
        elif kind == 1:
            body |= {"temperature": 0, "repetition_penalty": 1.3, "presence_penalty": 0.4}
        elif kind == 2:
            body |= {"temperature": rng.choice([0.5, 0.9, 1.3]), "top_p": rng.choice([0.8, 1.0]),
                     "top_k": rng.choice([0, 20]), "seed": rng.randint(0, 10_000)}
        else:
            body |= {"temperature": 1.0, "seed": index, "frequency_penalty": 0.5}
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
        if index % 8 == 7:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        requests.append(body)
    return requests


async def run_stream(client, body: dict) -> tuple[str, str, int]:
    """(text, finish reason, number of content chunks) of one streamed request."""
    if "messages" in body:
        stream = await client.chat.completions.create(model="tiny", messages=body["messages"],
                                                      **_fields(body, "messages"))
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        stream = await client.completions.create(model="tiny", prompt=body["prompt"], **_fields(body, "prompt"))
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].text for c in chunks)
    return text, chunks[-1].choices[0].finish_reason, len(chunks)


def _fields(body: dict, prompt_key: str) -> dict:
    standard = {"max_tokens", "stream", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"}
    return {
        **{k: v for k, v in body.items() if k in standard},
        "extra_body": {k: v for k, v in body.items() if k not in standard and k != prompt_key},
    }


async def test_64_concurrent_streams_equal_their_solo_runs(tiny_server, openai_client):
    requests = varied_requests(seed=7)
    solo = [await run_stream(openai_client, body) for body in requests]
    loop = asyncio.get_running_loop()
    start = loop.time()
    together = await asyncio.gather(*(run_stream(openai_client, body) for body in requests))
    elapsed = loop.time() - start
    for index, (body, alone, batched) in enumerate(zip(requests, solo, together)):
        assert batched[0] == alone[0], f"request {index} ({body}) differs when run with 63 others"
        assert batched[1] == alone[1] == "length"
    print(f"64 concurrent streams in {elapsed:.2f} s")
