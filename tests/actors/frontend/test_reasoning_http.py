"""A reasoning model's thinking split off on the chat route (``--reasoning-parser``): the choice reader on whole
texts (no engine), then a live ``fdctl serve --reasoning-parser deepseek_r1`` (random:tiny) whose text a regex
shapes as a reasoning model's, with a hermes tool call after the thinking."""
from __future__ import annotations

import json

import pytest

from fastdecode.actors.frontend.choice_text import ChoiceParsing
from fastdecode.actors.frontend.openai_request import parse_chat
from fastdecode.actors.frontend.tool_fields import ToolServing
from fastdecode.actors.reasoning_parsers import grammar_start_token
from fastdecode.cli.make_random_model import make_random_model
from live_server import TINY_ARGS, LiveServer

CHAT = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HERMES = ToolServing(is_auto_enabled=True, parser="hermes")
SHORT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"],
    "additionalProperties": False}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
THINK_ID, END_THINK_ID = 1, 2
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
    """random:tiny, whose vocabulary has no think tags, with a reasoning parser."""
    server = LiveServer(*TINY_ARGS, "--shards", "1", "--kv-memory", "128MiB", "--max-model-len", "256",
                        "--reasoning-parser", "deepseek_r1")
    yield server
    assert server.stop() == 0, server.log()


async def test_without_think_tokens_a_structured_output_holds_the_whole_text(reasoning_server):
    """A model that does not think in tags, served with a reasoning parser: a named call's grammar holds the whole
    text, which is then not split (it was all taken for thinking, the call's arguments left empty)."""
    client = _client(reasoning_server)
    response = await client.chat.completions.create(
        model="random:tiny", messages=CHAT, tools=[SHORT_TOOL], max_tokens=60, temperature=0, tool_choice=NAMED,
        extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    choice = response.choices[0]
    assert set(json.loads(choice.message.tool_calls[0].function.arguments, strict=False)) == {"city"}
    assert "reasoning_content" not in choice.model_dump()["message"]


class _Vocab:
    def __init__(self, **ids):
        self.ids = ids

    def convert_tokens_to_ids(self, token):
        return self.ids.get(token)


def test_the_grammar_waits_for_the_thinking_to_end_unless_the_prompt_ended_it():
    tokens = _Vocab(**{"<think>": 5, "</think>": 6})
    assert grammar_start_token(tokens, [1, 2, 5]) == 6  # R1's template opens the block
    assert grammar_start_token(tokens, [1, 2]) == 6  # the model will open it
    assert grammar_start_token(tokens, [1, 5, 9, 6, 3]) is None  # Qwen3 without thinking: closed in the prompt
    assert grammar_start_token(tokens, [6, 5, 3]) == 6  # an earlier turn's block closed, this one open
    assert grammar_start_token(_Vocab(), [1, 2]) is None  # no tags in this vocabulary: from the first token
    named = {"messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    request = parse_chat(named, reasoning_parser="deepseek_r1")
    assert request.for_tokenizer(tokens) is request
    assert request.for_tokenizer(_Vocab()).reasoning_parser is None  # the grammar holds the whole text: no split
    plain = parse_chat({"messages": CHAT}, reasoning_parser="deepseek_r1")
    assert plain.for_tokenizer(_Vocab()) is plain


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """random:tiny whose vocabulary has <think> and </think> tokens (ids 1 and 2, bytes no prompt here holds),
    with the deepseek_r1 and hermes parsers."""
    folder = tmp_path_factory.mktemp("thinking-tiny")
    make_random_model("tiny", 0, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for token, token_id in list(vocab.items()):
        if token_id in (THINK_ID, END_THINK_ID):
            del vocab[token]
    vocab.update({"<think>": THINK_ID, "</think>": END_THINK_ID})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    server = LiveServer("--model", str(folder), "--served-model-name", "thinker", "--dtype", "float32", "--device",
                        "cpu", "--shards", "1", "--kv-memory", "128MiB", "--max-model-len", "256",
                        "--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield server
    assert server.stop() == 0, server.log()


async def test_a_named_call_is_held_to_its_schema_after_the_thinking(thinking_server):
    """The grammar starts after </think> (a bias makes the model end its thinking at once, which a grammar from the
    first token would not allow): the call's arguments are the schema's JSON, not thinking."""
    response = await _client(thinking_server).chat.completions.create(
        model="thinker", messages=CHAT, tools=[SHORT_TOOL], max_tokens=60, temperature=0, tool_choice=NAMED,
        logit_bias={str(END_THINK_ID): 100}, extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    choice = response.choices[0]
    (call,) = choice.message.tool_calls
    assert set(json.loads(call.function.arguments, strict=False)) == {"city"}
    assert choice.model_dump()["message"]["reasoning_content"] is None and choice.finish_reason == "stop"


async def test_thinking_then_a_call_whole_and_streamed(thinking_server):
    """Free thinking until </think>, then the answer held to a regex that writes a hermes call: the thinking is
    reasoning_content, the call is parsed from the answer alone."""
    regex = r'Sure\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'
    kwargs = dict(model="thinker", messages=CHAT, tools=TOOLS, max_tokens=150, temperature=1.0,
                  logit_bias={str(END_THINK_ID): 3}, seed=0, extra_body={"guided_regex": regex})
    client = _client(thinking_server)
    choice = (await client.chat.completions.create(**kwargs)).choices[0]
    message = choice.model_dump()["message"]
    assert message["reasoning_content"] and message["content"] == "Sure." and choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [c.choices[0].delta.model_dump() for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    calls = [t for d in deltas for t in d.get("tool_calls") or []]
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in calls] == [
        ("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def _client(server):
    openai = pytest.importorskip("openai")
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


async def test_a_response_of_thinking_alone(thinking_server):
    """The Responses API with a reasoning model cut while it thinks: one reasoning item, incomplete, no empty
    message, its tokens counted as reasoning; the stream shows the same."""
    kwargs = dict(model="thinker", input="Hi", max_output_tokens=6, temperature=0.8,
                  extra_body={"seed": 1, "logit_bias": {str(END_THINK_ID): -100}})
    client = _client(thinking_server)
    response = await client.responses.create(**kwargs)
    assert [(item.type, item.status) for item in response.output] == [("reasoning", "incomplete")]
    assert response.status == "incomplete" and response.usage.output_tokens_details.reasoning_tokens == 6
    events = [e async for e in await client.responses.create(**kwargs, stream=True)]
    final = events[-1].response
    assert [(item.type, item.status) for item in final.output] == [("reasoning", "incomplete")]
    assert final.output[0].content[0].text == response.output[0].content[0].text


def test_the_split_starts_where_the_prompt_left_the_thinking():
    """QwQ's template opens the block in the prompt (qwen3 then reads the text as thinking up to </think>); Qwen3's
    without thinking closes it (deepseek_r1 then reads all of it as the answer), as the grammar's start reads it."""
    tokens = _Vocab(**{"<think>": 5, "</think>": 6})
    named = {"messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    opened = parse_chat(named, reasoning_parser="qwen3").parsing_for(tokens, [1, 2, 5])
    message, _ = opened.message('Let me think.</think>{"city": "Oslo"}', "assistant", "stop")
    assert message["reasoning_content"] == "Let me think."
    assert message["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    closed = parse_chat(named, reasoning_parser="deepseek_r1").parsing_for(tokens, [1, 5, 9, 6])
    message, _ = closed.message('{"city": "Oslo"}', "assistant", "stop")
    assert message["reasoning_content"] is None
    assert message["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    assert grammar_start_token(tokens, [1, 2, 5]) == 6 and grammar_start_token(tokens, [1, 5, 9, 6]) is None
    untagged = parse_chat({"messages": CHAT}, reasoning_parser="qwen3").parsing_for(tokens, [1, 2])
    assert untagged.message("Hi there", "assistant", "stop")[0]["content"] == "Hi there"  # the parser's own rule
