"""``/v1/stream`` with a real ``websockets`` client: tokens, done, errors, keys, disconnects."""
from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import API_KEY
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams
from metrics_scrape import ABORTED, is_freed, scrape, until_aborted_and_freed

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The capital of France is"


async def stream(url: str, request: dict, *, headers=AUTH) -> list[dict]:
    """Every message of one WebSocket request, until the server closes."""
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps(request))
        return [json.loads(raw) async for raw in ws]


async def test_stream_tokens_then_done(tiny_server, tiny_model):
    model, tokenizer = tiny_model
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = reference_generate(model, tokenizer, tokenizer.encode(PROMPT), params)
    messages = await stream(tiny_server.ws_url, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                                 "ignore_eos": True})
    tokens, done = messages[:-1], messages[-1]
    assert [m["type"] for m in tokens] == ["token"] * 16
    assert [m["token_id"] for m in tokens] == expected.token_ids
    assert "".join(m["text"] for m in tokens) == expected.text
    assert done == {"type": "done", "finish_reason": "length", "stop_reason": None,
                    "usage": {"prompt_tokens": len(expected.prompt_token_ids), "completion_tokens": 16,
                              "total_tokens": len(expected.prompt_token_ids) + 16}}


async def test_chat_messages_and_logprobs(tiny_server, tiny_model):
    tokenizer = tiny_model[1]
    chat = [{"role": "user", "content": "Hi"}]
    messages = await stream(tiny_server.ws_url, {"messages": chat, "max_tokens": 5, "temperature": 0,
                                                 "ignore_eos": True, "logprobs": 2})
    assert messages[-1]["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(chat))
    tokens = messages[:-1]
    assert all(m["logprob"] <= 0 and len(m["top_logprobs"]) == 2 for m in tokens)
    assert all(m["top_logprobs"][0][0] == m["token_id"] for m in tokens)  # greedy picks the top one


@pytest.mark.parametrize(("request_text", "fragment"), [
    ("{not json", "not valid JSON"),
    (json.dumps({"max_tokens": 4}), "prompt and messages"),
    (json.dumps({"prompt": "x", "temperature": -2}), "temperature"),
    (json.dumps({"prompt": "x", "model": "other"}), "does not exist"),
    ('{"prompt": "x", "temperature": 1' + "0" * 400 + "}", "temperature must be a finite number"),
    (json.dumps({"prompt": "x", "guided_regex": "(a+"}), "cannot be compiled"),
    # what the HTTP routes refuse, the WebSocket took and ignored
    (json.dumps({"prompt": "x", "suffix": "y"}), "suffix is not supported"),
    (json.dumps({"prompt": "x", "echo": True}), "echo is not supported"),
    (json.dumps({"prompt": "x", "response_format": {"type": "xml"}}), "response_format type must be"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}),
     "tools[0].function must be"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                 "tools": [{"type": "function", "function": {"name": "f"}}]}), "tool calls are not parsed here"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required"}), "`tools` must be set"),
])
async def test_bad_request_gets_an_error_message(tiny_server, request_text, fragment):
    async with connect(tiny_server.ws_url, additional_headers=AUTH) as ws:
        await ws.send(request_text)
        messages = [json.loads(raw) async for raw in ws]
    assert len(messages) == 1 and messages[0]["type"] == "error"
    assert fragment in messages[0]["message"]
    assert (await stream(tiny_server.ws_url, {"prompt": "x", "max_tokens": 2}))[-1]["type"] == "done"


async def test_chat_messages_take_max_completion_tokens_as_the_chat_route_does(tiny_server):
    """OpenAI's newer name of the chat output limit was ignored: the stream ran to the end of the context."""
    chat = [{"role": "user", "content": "Hi"}]
    messages = await stream(tiny_server.ws_url, {"messages": chat, "max_completion_tokens": 3, "ignore_eos": True})
    assert [m["type"] for m in messages] == ["token"] * 3 + ["done"]
    assert (messages[-1]["finish_reason"], messages[-1]["usage"]["completion_tokens"]) == ("length", 3)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["missing", "wrong"])
async def test_missing_or_wrong_key_is_refused_with_401(tiny_server, headers):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(tiny_server.ws_url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401


async def test_key_as_token_query_parameter(tiny_server):
    messages = await stream(f"{tiny_server.ws_url}?token={API_KEY}", {"prompt": "x", "max_tokens": 3, "min_tokens": 3},
                            headers={})
    assert messages[-1]["type"] == "done" and messages[-1]["usage"]["completion_tokens"] == 3


async def test_client_that_closes_cancels_its_request(tiny_server):
    num_aborted = (await scrape(tiny_server.url)).get(ABORTED, 0)
    async with connect(tiny_server.ws_url, additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}))
        for _ in range(3):
            assert json.loads(await ws.recv())["type"] == "token"
    after = await until_aborted_and_freed(tiny_server.url, num_aborted + 1)
    assert after.get(ABORTED, 0) == num_aborted + 1
    assert is_freed(after)


async def test_a_message_as_large_as_an_http_body_gets_an_answer(tiny_server):
    """A 5 MB request (past aiohttp's 4 MiB WebSocket default, within the HTTP routes' 16 MiB) is read and answered:
    here its prompt is too long for the context, an error event with its status, not a silent close (1009)."""
    async with connect(tiny_server.ws_url, additional_headers=AUTH, max_size=None) as ws:
        await ws.send(json.dumps({"prompt": "a" * (5 << 20), "max_tokens": 2}))
        messages = [json.loads(raw) async for raw in ws]
    assert len(messages) == 1 and messages[0]["type"] == "error" and messages[0]["status"] == 400
    assert "too long" in messages[0]["message"]


@pytest.mark.parametrize("second", [json.dumps({"prompt": "B", "max_tokens": 3}), b"\x00\x01"], ids=["text", "binary"])
async def test_a_second_request_on_a_busy_socket_gets_an_error_and_the_first_runs_on(tiny_server, second):
    """One request per socket: a further message while the first request runs was silently ignored (its sender
    waited for an answer that never came). It gets an error event and counts as a refused request (400); the
    running request's tokens and ``done`` come as before, then the close."""
    rejected = ("fastdecode_request_rejected_total", (("status_code", "400"),))
    num_rejected = (await scrape(tiny_server.url)).get(rejected, 0)
    async with connect(tiny_server.ws_url, additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 32, "ignore_eos": True}))
        await ws.send(second)
        messages = [json.loads(raw) async for raw in ws]
    assert ws.close_code == 1000
    errors = [i for i, m in enumerate(messages) if m["type"] == "error"]
    assert len(errors) == 1 and errors[0] < len(messages) - 1  # answered while the first request ran
    error = messages.pop(errors[0])
    assert error["status"] == 400 and "one request per socket" in error["message"]
    assert "open a new socket" in error["message"]
    assert [m["type"] for m in messages] == ["token"] * 32 + ["done"]
    assert messages[-1]["finish_reason"] == "length" and messages[-1]["usage"]["completion_tokens"] == 32
    assert (await scrape(tiny_server.url)).get(rejected, 0) == num_rejected + 1


async def test_clients_that_close_right_after_sending_each_count_one_abort(tiny_server):
    """5 clients closing at once after their request counted 1 abort: the others left while their prompts were
    tokenized, which counted nothing."""
    num_aborted = (await scrape(tiny_server.url)).get(ABORTED, 0)

    async def send_and_leave(index: int) -> None:
        async with connect(tiny_server.ws_url, additional_headers=AUTH) as ws:
            await ws.send(json.dumps({"prompt": f"Item {index}", "max_tokens": 200, "ignore_eos": True}))

    await asyncio.gather(*(send_and_leave(index) for index in range(5)))
    after = await until_aborted_and_freed(tiny_server.url, num_aborted + 5)
    assert after.get(ABORTED, 0) == num_aborted + 5
    assert is_freed(after)
