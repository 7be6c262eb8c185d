"""Every refusal answers its status code in the OpenAI error shape, and the server keeps serving."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from conftest import API_KEY, MAX_MODEL_LEN
from live_server import TINY_ARGS, LiveServer
from metrics_scrape import scrape

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}


async def post(url: str, body, *, headers=AUTH, path="/v1/completions") -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers=headers) as session:
        kwargs = {"data": body} if isinstance(body, (str, bytes)) else {"json": body}
        async with session.post(url + path, **kwargs) as response:
            return response.status, await response.json(content_type=None)


def assert_error_shape(payload: dict) -> dict:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


BAD_REQUESTS = [
    pytest.param("{not json", None, id="malformed-json"),
    pytest.param("[1, 2]", None, id="not-an-object"),
    pytest.param({**OK_BODY, "temperature": "hot"}, "temperature", id="temperature-type"),
    pytest.param({**OK_BODY, "temperature": -1}, "temperature", id="temperature-range"),
    pytest.param({**OK_BODY, "top_p": 0}, "top_p", id="top-p-range"),
    pytest.param({**OK_BODY, "max_tokens": 0}, "max_tokens", id="max-tokens"),
    pytest.param({**OK_BODY, "n": 0}, "n", id="n-below-1"),
    pytest.param({**OK_BODY, "n": 2, "best_of": 3}, "best_of", id="best-of-not-n"),
    pytest.param({**OK_BODY, "n": 4097}, "n", id="choices-past-max-queue"),  # the default --max-queue: 4096
    pytest.param({**OK_BODY, "prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({**OK_BODY, "prompt": ["a", ""]}, "prompt", id="empty-prompt-in-a-batch"),
    pytest.param({**OK_BODY, "prompt": ["a", [1, 10**9]]}, "prompt", id="token-id-out-of-range-in-a-batch"),
    pytest.param({**OK_BODY, "prompt": [1, 10**9]}, "prompt", id="token-id-out-of-range"),
    pytest.param({**OK_BODY, "stop": [""]}, "stop", id="empty-stop"),
    pytest.param({**OK_BODY, "stream_options": {"include_usage": True}}, "stream_options", id="usage-without-stream"),
    pytest.param({**OK_BODY, "logprobs": 50}, "logprobs", id="logprobs-range"),
    pytest.param({**OK_BODY, "prompt": "a " * (MAX_MODEL_LEN + 10)}, "prompt", id="prompt-too-long"),
    pytest.param({**OK_BODY, "max_tokens": MAX_MODEL_LEN}, "max_tokens", id="max-tokens-past-context"),
    pytest.param('{"prompt": "x", "temperature": 1' + "0" * 400 + "}", "temperature", id="int-past-float-range"),
    pytest.param({**OK_BODY, "seed": 2**64}, "seed", id="seed-past-int64"),
    pytest.param({**OK_BODY, "min_p": 1.5}, "min_p", id="min-p-range"),
    pytest.param({**OK_BODY, "logit_bias": {"1": 101}}, "logit_bias", id="logit-bias-range"),
    pytest.param('{"a": ' * 5000 + "1" + "}" * 5000, None, id="json-nested-too-deeply"),  # was a 500
    pytest.param('{"prompt": "\\ud800", "max_tokens": 2}', "prompt", id="lone-surrogate"),  # was a 500
    pytest.param('{"prompt": ["hi", "\\ud800"], "max_tokens": 2}', "prompt[1]", id="lone-surrogate-in-a-batch"),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
async def test_bad_completion_requests_get_400(tiny_server, body, param):
    status, payload = await post(tiny_server.url, body)
    assert status == 400, payload
    error = assert_error_shape(payload)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("body", [
    {"model": "tiny", "max_tokens": 4},
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"role": "user"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"},
], ids=["no-messages", "empty-messages", "no-content", "top-logprobs-alone", "logprobs-type"])
async def test_bad_chat_requests_get_400(tiny_server, body):
    status, payload = await post(tiny_server.url, body, path="/v1/chat/completions")
    assert status == 400, payload
    assert_error_shape(payload)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),  # the whole vocabulary, past 20
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 21},
     "prompt_logprobs"),
])
async def test_logprobs_past_the_servers_limit_name_the_field_sent(tiny_server, path, body, param):
    status, payload = await post(tiny_server.url, {"model": "tiny", "max_tokens": 2, **body}, path=path)
    assert status == 400 and assert_error_shape(payload)["param"] == param, payload
    assert "which is greater than max allowed: 20" in payload["error"]["message"]


async def test_prompt_too_long_says_why(tiny_server):
    status, payload = await post(tiny_server.url, {**OK_BODY, "prompt": list(range(1, MAX_MODEL_LEN + 1))})
    assert status == 400
    error = assert_error_shape(payload)
    assert error["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_unknown_model_gets_404(tiny_server, path):
    body = {**OK_BODY, "model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    status, payload = await post(tiny_server.url, body, path=path)
    assert status == 404
    error = assert_error_shape(payload)
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize("headers, query", [({}, ""), ({"Authorization": "Bearer wrong"}, ""),
                                            ({"Authorization": API_KEY}, ""), ({}, f"?token={API_KEY}"),
                                            ({"Authorization": "Basic x"}, f"?token={API_KEY}")],
                         ids=["missing", "wrong", "not-bearer", "query-off-the-websocket", "query-over-basic"])
async def test_missing_or_wrong_key_gets_401(tiny_server, headers, query):
    """Only the header carries the key on HTTP routes (as vLLM); ?token= is the WebSocket's, for browsers."""
    status, payload = await post(tiny_server.url, OK_BODY, headers=headers, path="/v1/completions" + query)
    assert status == 401
    assert assert_error_shape(payload)["type"] == "authentication_error"
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(tiny_server.url + "/v1/models" + query) as response:
            assert response.status == 401


async def test_health_and_metrics_need_no_key(tiny_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(tiny_server.url + "/health") as response:
            assert response.status == 200
        async with session.get(tiny_server.url + "/metrics") as response:
            assert response.status == 200


async def test_unknown_route_is_a_json_404(tiny_server):
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.get(tiny_server.url + "/v1/nothing-here") as response:
            assert response.status == 404
            assert_error_shape(await response.json())


async def test_server_keeps_serving_after_errors(tiny_server):
    for body in ("{", {**OK_BODY, "n": 0}, {**OK_BODY, "model": "nope"}):
        await post(tiny_server.url, body)
    status, payload = await post(tiny_server.url, OK_BODY)
    assert status == 200
    assert payload["usage"]["completion_tokens"] >= 1


# ---- the queue limit, on a server that runs one sequence and queues one ------------------------------
@pytest.fixture(scope="module")
def one_slot_server():
    server = LiveServer(*TINY_ARGS, "--shards", "0", "--max-num-seqs", "1", "--max-queue", "1")
    yield server
    assert server.stop() == 0, f"the server did not stop cleanly on SIGTERM:\n{server.log()}"


async def _wait_for(url: str, name: str, value: float, labels: dict | None = None, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        current = (await scrape(url)).get((name, tuple(sorted((labels or {}).items()))))
        if current == value:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{name}{labels or ''} stayed {current}, not {value}"
        await asyncio.sleep(0.02)


async def test_past_max_queue_gets_429_and_disconnect_frees_kv(one_slot_server):
    url = one_slot_server.url
    long_body = {"prompt": "Hello", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    short_body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
    before = await scrape(url)
    async with aiohttp.ClientSession() as session:
        running = await session.post(url + "/v1/completions", json=long_body)
        assert running.status == 200
        await running.content.readline()  # the first event: it is running now
        queued = asyncio.create_task(post(url, short_body, headers={}))
        await _wait_for(url, "fastdecode_num_requests_waiting", 1)
        async with session.post(url + "/v1/completions", json=short_body) as refused:
            assert refused.status == 429
            assert refused.headers["Retry-After"] == "1"  # the OpenAI clients' retries wait for it
            assert assert_error_shape(await refused.json())["code"] == "queue_full"
        running.close()  # the client leaves: the long request is cancelled, the queued one runs
        status, payload = await queued
        assert status == 200 and payload["usage"]["completion_tokens"] == 3
    after = await scrape(url)
    aborted = ("fastdecode_request_success_total", (("finished_reason", "abort"),))
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    rejected = ("fastdecode_request_rejected_total", (("status_code", "429"),))
    assert after[rejected] == before.get(rejected, 0) + 1
    assert [v for (name, _), v in after.items() if name == "fastdecode_kv_used_bytes"] == [0]
    assert after[("fastdecode_num_requests_running", ())] == 0
    status, _ = await post(url, short_body, headers={})
    assert status == 200
