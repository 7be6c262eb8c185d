"""A reasoning model's thinking split off on the chat route (``--reasoning-parser``): the choice reader on whole
texts (no engine), then a live ``fdctl serve --reasoning-parser deepseek_r1`` (random:tiny) whose text a regex
shapes as a reasoning model's, with a hermes tool call after the thinking."""
from __future__ import annotations

import json

import pytest

from fastdecode.actors.frontend.choice_text import ChoiceParsing
from fastdecode.actors.frontend.openai_request import parse_chat
from fastdecode.actors.frontend.tool_fields import ToolServing
from live_server import TINY_ARGS, LiveServer

CHAT = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HERMES = ToolServing(is_auto_enabled=True, parser="hermes")
THOUGHT_CALL = 'I should look it up.</think><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_the_message_holds_the_reasoning_apart_and_calls_from_the_content():
    auto = parse_chat({"messages": CHAT, "tools": TOOLS}, tool_serving=HERMES, reasoning_parser="deepseek_r1")
    message, finish_reason = auto.parsing.message(THOUGHT_CALL, "assistant", "stop")
    assert (message["reasoning_content"], message["reasoning"]) == ("I should look it up.", "I should look it up.")
    assert message["content"] is None and finish_reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]
    plain = ChoiceParsing(reasoning_parser="deepseek_r1")
    assert plain.message("hmm</think>Sunny.", "assistant", "stop")[0] == {
        "role": "assistant", "content": "Sunny.", "tool_calls": [], "reasoning_content": "hmm", "reasoning": "hmm"}
    assert plain.message("no end", "assistant", "length")[0]["content"] is None  # all of it reasoning
    hidden = parse_chat({"messages": CHAT, "include_reasoning": False}, reasoning_parser="qwen3").parsing
    assert hidden.message("<think>hmm</think>Sunny.", "assistant", "stop")[0]["reasoning_content"] is None
    assert parse_chat({"messages": CHAT}).parsing is None  # no parser, no tools: the text as it is
    named = parse_chat({"messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {
        "name": "get_weather"}}}, reasoning_parser="qwen3").parsing
    message, finish_reason = named.message('{"city": "Oslo"}', "assistant", "stop")
    assert (message["content"], finish_reason) == ("", "stop")  # vLLM's for a named call, with a parser too


@pytest.fixture(scope="module")
def reasoning_server():
    server = LiveServer(*TINY_ARGS, "--shards", "1", "--kv-memory", "128MiB", "--max-model-len", "256",
                        "--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice", "--tool-call-parser",
                        "hermes")
    yield server
    assert server.stop() == 0, server.log()


async def test_a_reasoning_answer_whole_and_streamed(reasoning_server):
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=reasoning_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    regex = r'I should look it up\.</think><tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}' \
            r'</tool_call>'
    kwargs = dict(model="random:tiny", messages=CHAT, tools=TOOLS, max_tokens=150, temperature=0,
                  extra_body={"guided_regex": regex})
    choice = (await client.chat.completions.create(**kwargs)).choices[0]
    message = choice.model_dump()["message"]
    assert message["reasoning_content"] == "I should look it up." and message["content"] is None
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [c.choices[0].delta.model_dump() for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "I should look it up."
    assert "".join(d.get("content") or "" for d in deltas) == ""
    calls = [t for d in deltas for t in d.get("tool_calls") or []]
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in calls] == [
        ("get_weather", choice.message.tool_calls[0].function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
