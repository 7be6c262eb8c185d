"""Tool calling on the chat route as vLLM does it: ``tools`` and ``tool_choice`` parsed and checked (no engine), then
served by the folder's live ``fdctl serve`` (random:tiny, ``--enable-auto-tool-choice --tool-call-parser hermes``),
whose text left alone is no call: the named and required forms hold it to the tools' schemas, and a regex makes it
write hermes' tags for the auto form."""
from __future__ import annotations

import json

import pytest

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.openai_request import parse_chat, parse_stream_request
from fastdecode.actors.frontend.tool_fields import ToolServing
from fastdecode.actors.structured_output import StructuredOutputs

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
HERMES = ToolServing(is_auto_enabled=True, parser="hermes")
NESTED: dict = {}
for _ in range(900):  # deep, but within what the body's JSON decoder takes
    NESTED = {"x": NESTED}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


def refused(body: dict, serving: ToolServing = HERMES) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat({"messages": CHAT, **body}, tool_serving=serving)
    assert info.value.status == 400
    return info.value


def test_the_default_choice_is_auto_with_tools_and_needs_the_servers_parser():
    request = parse_chat({"messages": CHAT, "tools": TOOLS}, tool_serving=HERMES)
    assert (request.tool_calling.choice, request.tool_calling.parser) == ("auto", "hermes")
    assert request.chat_template_kwargs["tools"][0]["function"]["name"] == "get_weather"
    assert request.sampling["skip_special_tokens"] is False  # hermes' tags may be special tokens (vLLM's)
    assert parse_chat({"messages": CHAT, "tools": TOOLS, "skip_special_tokens": True},
                      tool_serving=HERMES).sampling["skip_special_tokens"] is True  # the request's own wins
    error = refused({"tools": TOOLS}, ToolServing())
    assert error.param == "tool_choice" and "--enable-auto-tool-choice and --tool-call-parser" in error.message
    assert parse_chat({"messages": CHAT}, tool_serving=HERMES).tool_calling is None
    assert parse_chat({"messages": CHAT, "tools": TOOLS, "tool_choice": "none"}).tool_calling is None


def test_named_and_required_choices_are_structured_outputs_of_the_tools():
    named = parse_chat({"messages": CHAT, "tools": TOOLS, "tool_choice": NAMED}).sampling_params(5, 100)
    assert named.structured_outputs == StructuredOutputs(json=WEATHER)
    required = parse_chat({"messages": CHAT, "tools": TOOLS, "tool_choice": "required"})
    schema = json.loads(required.sampling_params(5, 100).structured_outputs.json)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    single = parse_chat({"messages": CHAT, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert json.loads(single.sampling_params(5, 100).structured_outputs.json)["maxItems"] == 1


def test_required_merges_the_tools_defs():
    defs_tool = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}
    request = parse_chat({"messages": CHAT, "tools": [*TOOLS, defs_tool], "tool_choice": "required"})
    schema = json.loads(request.sampling_params(5, 100).structured_outputs.json)
    assert schema["$defs"] == {"P": {"type": "integer"}}
    assert "$defs" not in schema["items"]["anyOf"][2]["properties"]["parameters"]
    assert defs_tool["function"]["parameters"]["$defs"]  # the request's own schema is left as it was
    clash = {"type": "function", "function": {"name": "h", "parameters": {"$defs": {"P": {"type": "string"}}}}}
    assert refused({"tools": [defs_tool, clash], "tool_choice": "required"}).param == "tools[1]"


@pytest.mark.parametrize("body, param, fragment", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "does not match any of the specified `tools`"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "Invalid value for `function`"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": ""}}}, "tool_choice", "Invalid `name`"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "Only named tools"),
    ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters",
     "JSON schema object"),
    ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "response_format",
     "give one structured output, not 2 (tool_choice, response_format)"),
    ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls", "true or false"),
    ({"tools": TOOLS, "functions": [{"name": "f"}]}, "functions", "not both"),
    ({"function_call": "auto"}, "function_call", "needs functions"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call", "not one of the functions"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": NESTED}}], "tool_choice": "required"},
     "tools", "nest too deeply"),
])
def test_bad_tool_fields_are_a_400_naming_the_field(body, param, fragment):
    error = refused(body)
    assert error.param == param and fragment in error.message


def test_auto_goes_with_a_structured_output():
    request = parse_chat({"messages": CHAT, "tools": TOOLS, "guided_regex": "[a-z]+"}, tool_serving=HERMES)
    assert request.tool_calling.is_auto and request.sampling["structured_outputs"].regex == "[a-z]+"


def test_the_legacy_functions_are_tools():
    request = parse_chat({"messages": CHAT, "functions": [{"name": "get_time"}], "function_call": {"name": "get_time"}})
    assert (request.tool_calling.choice, request.tool_calling.function_name) == ("named", "get_time")
    assert request.chat_template_kwargs["tools"] == [{"type": "function", "function": {"name": "get_time",
                                                                                         "parameters": None}}]
    assert parse_chat({"messages": CHAT, "functions": [{"name": "f"}], "function_call": "none"}).tool_calling is None


def test_the_websocket_parses_no_calls():
    with pytest.raises(ApiError) as info:
        parse_stream_request({"messages": CHAT, "tools": TOOLS, "tool_choice": "required"})
    assert info.value.param == "tool_choice" and "/v1/chat/completions" in info.value.message
    assert parse_stream_request({"messages": CHAT, "tools": TOOLS, "tool_choice": "none"}).tool_calling is None


# ---- live ------------------------------------------------------------------------------------------------------
async def test_a_named_choice_calls_that_function_whole_and_streamed(openai_client):
    kwargs = dict(model="tiny", messages=CHAT, tools=TOOLS, tool_choice=NAMED, max_tokens=60, temperature=0.8,
                  seed=3, extra_body=COMPACT)
    choice = (await openai_client.chat.completions.create(**kwargs)).choices[0]
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments, strict=False)
    assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
    assert choice.message.content == "" and choice.finish_reason == "stop"  # vLLM's, for a named call
    chunks = [c async for c in await openai_client.chat.completions.create(**kwargs, stream=True) if c.choices]
    parts = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert parts[0].function.name == "get_weather" and parts[0].id and all(p.index == 0 for p in parts)
    assert all(p.function.name is None and p.id is None for p in parts[1:])
    assert "".join(p.function.arguments for p in parts) == call.function.arguments  # the same seed
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_required_choice_calls_one_or_more_of_the_tools(openai_client):
    """get_time takes no arguments here (without parameters, any object: the random model's may not end)."""
    tools = [TOOLS[0], {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]
    kwargs = dict(model="tiny", messages=CHAT, tools=tools, tool_choice="required", max_tokens=150, temperature=0.8,
                  seed=5, extra_body=COMPACT)
    choice = (await openai_client.chat.completions.create(**kwargs)).choices[0]
    calls = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""  # vLLM's, for required calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls), choice.message
    for call in calls:
        arguments = json.loads(call.function.arguments, strict=False)
        assert call.function.name == "get_time" or set(arguments) == {"city", "unit"}
    chunks = [c async for c in await openai_client.chat.completions.create(**kwargs, stream=True) if c.choices]
    parts = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(p.index, p.function.name, p.function.arguments) for p in parts] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(calls)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


HERMES_REGEX = r'I will look\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "c"\}\}' \
               r'</tool_call>'


async def test_auto_finds_the_calls_the_model_wrote(openai_client):
    """The regex makes the tiny model write a hermes call, as a tool-calling model would."""
    kwargs = dict(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=150, temperature=0,
                  extra_body={"guided_regex": HERMES_REGEX})
    choice = (await openai_client.chat.completions.create(**kwargs)).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will look."
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "unit": "c"})
    chunks = [c async for c in await openai_client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "I will look."
    parts = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(p.function.name, p.function.arguments) for p in parts] == [(call.function.name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_auto_without_a_call_is_a_plain_answer(openai_client):
    response = await openai_client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=5,
                                                           temperature=0, extra_body={"guided_regex": "[a-z]{5}"})
    choice = response.choices[0]
    assert choice.message.tool_calls == [] and len(choice.message.content) == 5 and choice.finish_reason == "length"


def test_the_response_role_names_the_message_and_first_chunk():
    from fastdecode.actors.api import StreamOutput
    from fastdecode.actors.frontend.openai_response import ResponseBuilder

    builder = ResponseBuilder.new("m", is_chat=True, token_text=str, role="bot")
    out = StreamOutput(request_id=1, token_id=5, text="hi", finish_reason="stop")
    assert builder.choice([out], "stop")["message"] == {"role": "bot", "content": "hi", "tool_calls": []}
    assert builder.role_chunk()["choices"][0]["delta"] == {"role": "bot", "content": ""}
