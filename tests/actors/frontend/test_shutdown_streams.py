"""Streams open when the server stops past its drain deadline end cleanly: the 503 "shutting down" error
event, then ``data: [DONE]`` (no cut-off chunk); a request that arrives while draining is told so."""
from __future__ import annotations

import asyncio
import json

import aiohttp

from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.frontend import FrontendConfig, ServeConfig, serve

NUM_STREAMS = 4
BODIES = [
    {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True, "logprobs": 2},
    {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "ignore_eos": True, "stream": True,
     "logprobs": True, "top_logprobs": 1},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "ignore_eos": True, "stream": True},
]


async def read_stream(session: aiohttp.ClientSession, url: str, body: dict, started: asyncio.Event) -> list[str]:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    events = []
    async with session.post(url + path, json=body) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) >= 3:
                    started.set()
    return events


async def test_streams_open_at_shutdown_end_with_an_error_event_and_done():
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    config = ServeConfig(cluster=ClusterConfig(model="random:tiny", seed=0, dtype="float32", device="cpu"),
                         frontend=FrontendConfig(served_model_name="tiny"), port=0, drain_timeout_s=0.3)
    server = asyncio.create_task(serve(config, on_ready=ready.set_result, stop=stop))
    url = await asyncio.wait_for(ready, 60)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = [asyncio.Event() for _ in BODIES]
        readers = [asyncio.create_task(read_stream(session, url, body, event))
                   for body, event in zip(BODIES, started)]
        await asyncio.gather(*(event.wait() for event in started))
        stop.set()
        await asyncio.sleep(0.1)  # draining now: a new request is refused as such
        async with session.post(url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}) as late:
            error = (await late.json())["error"]
            assert late.status == 503 and error["code"] == "draining" and "draining" in error["message"]
        results = await asyncio.gather(*readers)
    await asyncio.wait_for(server, 30)
    for events in results:
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert "shutting down" in error["message"] and error["code"] == "unavailable"
        assert all("choices" in json.loads(event) for event in events[:-2])
