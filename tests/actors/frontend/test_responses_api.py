"""OpenAI's Responses API (``POST /v1/responses``): the request as the chat request it asks for (no engine), then the
folder's live ``fdctl serve`` (random:tiny, hermes tool calls) through the openai client, whole and streamed."""
from __future__ import annotations

import json

import pytest

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.openai_request import parse_chat
from fastdecode.actors.frontend.responses_request import chat_body_of

TOOL = {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
    "additionalProperties": False}}


def test_input_items_become_the_chat_messages():
    body = {"model": "m", "instructions": "Be brief.", "max_output_tokens": 20, "temperature": 0.5, "store": False,
            "input": [{"role": "developer", "content": "Use tools."},
                      {"role": "user", "content": [{"type": "input_text", "text": "Paris"},
                                                   {"type": "input_text", "text": "weather?"}]},
                      {"type": "reasoning", "id": "rs_1", "summary": []},
                      {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "P"}'},
                      {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
            "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}}}
    chat = chat_body_of(body)
    assert [m["role"] for m in chat["messages"]] == ["system", "system", "user", "assistant", "tool"]
    assert chat["messages"][2]["content"] == "Paris\nweather?"
    assert [c["id"] for c in chat["messages"][3]["tool_calls"]] == ["c1", "c2"]  # parallel calls: one message
    assert chat["messages"][4] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert (chat["max_completion_tokens"], chat["temperature"]) == (20, 0.5)
    assert chat["tools"] == [{"type": "function", "function": {k: TOOL[k] for k in ("name", "description",
                                                                                     "parameters")}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"]["json_schema"]["schema"] == {"type": "object"}
    with pytest.raises(ApiError, match="give one structured output"):  # a named call is a structured output too
        parse_chat(chat)
    assert chat_body_of({"input": "hi"})["messages"] == [{"role": "user", "content": "hi"}]
    # the Agents SDK's agent without tools: an empty list, and auto of nothing, are no tools
    assert "tools" not in chat_body_of({"input": "hi", "tools": [], "tool_choice": "auto"})
    assert "tool_choice" not in chat_body_of({"input": "hi", "tools": [], "tool_choice": "auto"})


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "hi", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "hi", "n": 2}, "n"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
    ({"input": ""}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
])
def test_what_is_not_done_here_is_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        chat_body_of(body)
    assert (info.value.status, info.value.param) == (400, param)


# ---- live ------------------------------------------------------------------------------------------------------
async def test_a_text_response_whole_and_streamed(openai_client):
    kwargs = dict(model="tiny", input="Say something.", instructions="Be brief.", max_output_tokens=8,
                  temperature=0.8, extra_body={"seed": 2})
    response = await openai_client.responses.create(**kwargs)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert response.output_text == item.content[0].text and response.usage.output_tokens == 8
    stream = await openai_client.responses.create(**kwargs, stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == response.output_text == events[-1].response.output_text  # the same seed


async def test_a_named_function_call_whole_and_streamed(openai_client):
    kwargs = dict(model="tiny", input="Weather in Paris?", tools=[TOOL],
                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, temperature=0.7,
                  extra_body={"seed": 3, "structured_outputs": {"disable_any_whitespace": True}})
    response = await openai_client.responses.create(**kwargs)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and response.status == "completed"
    assert set(json.loads(calls[0].arguments, strict=False)) == {"city"}
    events = [event async for event in await openai_client.responses.create(**kwargs, stream=True)]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [a.item.type for a in added] == ["function_call"] and added[0].item.name == "get_weather"
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == calls[0].arguments
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == arguments and events[-1].type == "response.completed"


async def test_auto_finds_a_hermes_call_after_text(openai_client):
    regex = r'Checking\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'
    response = await openai_client.responses.create(model="tiny", input="Weather?", tools=[TOOL], temperature=0,
                                                    max_output_tokens=150, extra_body={"structured_outputs": {
                                                        "regex": regex}})
    assert [item.type for item in response.output] == ["message", "function_call"]
    assert response.output_text == "Checking." and json.loads(response.output[1].arguments) == {"city": "Paris"}
    # the model's call and its result sent back: the next turn is served
    follow_up = [{"role": "user", "content": "Weather?"}, response.output[1].model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": response.output[1].call_id, "output": "sunny"}]
    again = await openai_client.responses.create(model="tiny", input=follow_up, tools=[TOOL], tool_choice="none",
                                                 max_output_tokens=3)
    assert again.output[0].type == "message" and again.usage.input_tokens > response.usage.input_tokens


async def test_text_after_a_call_is_a_message_after_it_whole_and_streamed(openai_client):
    regex = r'Ok <tool_call>\{"name": "get_weather", "arguments": \{"city": "Rome"\}\}</tool_call> done'
    kwargs = dict(model="tiny", input="Weather?", tools=[TOOL], temperature=0, max_output_tokens=150,
                  extra_body={"guided_regex": regex})
    response = await openai_client.responses.create(**kwargs)
    shown = [(i.type, i.content[0].text if i.type == "message" else i.arguments) for i in response.output]
    assert shown == [("message", "Ok "), ("function_call", '{"city": "Rome"}'), ("message", " done")]
    events = [e async for e in await openai_client.responses.create(**kwargs, stream=True)]
    final = events[-1].response
    assert [(i.type, i.content[0].text if i.type == "message" else i.arguments) for i in final.output] == shown
    assert response.store is False and (response.temperature, response.top_p) == (0, 1.0)  # nothing kept; defaults


async def test_a_bad_request_is_a_400_naming_the_responses_field(openai_client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.responses.create(model="tiny", input="hi", previous_response_id="resp_x")
    assert "previous_response_id is not supported; no response is kept" in str(info.value)
    for fields, param in (({"max_output_tokens": 0}, "max_output_tokens"),
                          ({"max_output_tokens": 100000}, "max_output_tokens"),
                          ({"text": {"format": {"type": "json_schema", "name": "x",
                                                "schema": {"type": "string", "pattern": "(("}}}}, "text.format")):
        with pytest.raises(openai.BadRequestError) as info:
            await openai_client.responses.create(model="tiny", input="hi", **fields)
        assert info.value.body["param"] == param, info.value.body
    with pytest.raises(openai.NotFoundError):
        await openai_client.responses.create(model="other", input="hi")
