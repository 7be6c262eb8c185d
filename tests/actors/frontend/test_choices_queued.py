"""Several choices on a server that runs one sequence at a time: the response starts with the running choice
while the others wait (they used to hold every byte back until the last was admitted), and a request with more
choices than the queue holds is a 400 naming ``n`` (an idle server answered 429 to every retry)."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from live_server import TINY_ARGS, LiveServer
from metrics_scrape import scrape

WAITING = ("fastdecode_num_requests_waiting", ())
RUNNING = ("fastdecode_num_requests_running", ())


@pytest.fixture(scope="module")
def one_running_server():
    server = LiveServer(*TINY_ARGS, "--shards", "0", "--max-num-seqs", "1", "--max-queue", "4")
    yield server
    assert server.stop() == 0, f"the server did not stop cleanly on SIGTERM:\n{server.log()}"


async def test_the_stream_starts_while_a_choice_still_waits(one_running_server):
    url = one_running_server.url
    body = {"prompt": [1, 2, 3], "n": 2, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    tokens: dict[int, str] = {0: "", 1: ""}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=body) as response:
            assert response.status == 200
            first = json.loads((await response.content.readline()).decode().removeprefix("data: "))
            assert first["choices"][0]["index"] == 0
            tokens[0] += first["choices"][0]["text"]
            assert (await scrape(url))[WAITING] == 1  # the second choice has not started: it waits its turn
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    for choice in json.loads(line.removeprefix("data: "))["choices"]:
                        tokens[choice["index"]] += choice["text"]
    assert tokens[0] and tokens[0] == tokens[1]  # greedy: the same text, the second after the first


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_a_queued_stream_of_one_choice_has_its_headers_at_once(one_running_server, route):
    """As vLLM's: the headers go out once the request is submitted, not with its first token (a client with a time
    limit on headers gave up on a request that was only queued)."""
    url = one_running_server.url
    running_body = {"prompt": [1, 2, 3], "max_tokens": 2040, "temperature": 0, "ignore_eos": True, "stream": True}
    queued_body = {"max_tokens": 4, "stream": True, "temperature": 0}
    queued_body.update({"prompt": [4, 5, 6]} if route == "/v1/completions"
                       else {"messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=running_body) as running:
            await running.content.readline()  # the first request runs, for a few seconds
            async with session.post(url + route, json=queued_body) as queued:
                assert queued.status == 200 and queued.content_type == "text/event-stream"
                assert (await scrape(url))[WAITING] == 1  # its headers came while it still waits
                running.close()  # the queued one runs once the first is gone
                lines = [raw.decode().strip() async for raw in queued.content if raw.strip()]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


async def test_more_choices_than_the_queue_holds_is_a_400_naming_n(one_running_server):
    async with aiohttp.ClientSession() as session:
        async with session.post(one_running_server.url + "/v1/completions",
                                json={"prompt": "hi", "n": 5, "max_tokens": 2}) as response:
            assert response.status == 400 and "Retry-After" not in response.headers
            assert (await response.json())["error"]["param"] == "n"


async def test_a_websocket_closed_while_its_request_waits_leaves_the_queue_at_once(one_running_server):
    """Nothing read the socket before the first output came: a client that closed politely while queued waited for
    the server's close until its request had been admitted (after the one ahead of it) and prefilled."""
    url = one_running_server.url
    body = {"prompt": [1, 2, 3], "max_tokens": 2040, "temperature": 0, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=body) as running:
            await running.content.readline()  # the first request runs, for a few seconds
            ws = await session.ws_connect(url.replace("http", "ws") + "/v1/stream")
            await ws.send_json({"prompt": [4, 5, 6], "max_tokens": 8})
            for _ in range(200):
                if (await scrape(url))[WAITING] == 1:
                    break
                await asyncio.sleep(0.01)
            assert (await scrape(url))[WAITING] == 1
            start = time.monotonic()
            await ws.close()  # waits for the server's close frame
            took_s = time.monotonic() - start
            for _ in range(100):  # the Executor drops it at its next step
                samples = await scrape(url)
                if samples[WAITING] == 0:
                    break
                await asyncio.sleep(0.01)
    assert took_s < 1.0, f"the server answered the close after {took_s:.1f} s"
    assert samples[WAITING] == 0 and samples[RUNNING] == 1  # it left the queue; the first one still runs
