"""Structured outputs over HTTP as a vLLM client sends them: OpenAI's ``response_format`` (json_object,
json_schema), vLLM's ``structured_outputs`` and ``guided_*`` fields; parsed and checked (no engine), then served by
a live ``fdctl serve`` (random:tiny), whose text left alone is no JSON."""
from __future__ import annotations

import json
import re

import pytest

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.openai_request import parse_chat, parse_completion, parse_stream_request
from fastdecode.actors.structured_output import StructuredOutputs

CHAT = [{"role": "user", "content": "Give me a person as JSON"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"}}, "required": ["name", "ok"]}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


@pytest.mark.parametrize("field, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}},
     StructuredOutputs(json=SCHEMA)),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "[a-z]+", "disable_any_whitespace": False}}, StructuredOutputs(regex="[a-z]+")),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputs(json=SCHEMA)),
    ({"guided_choice": ["a", "b"], "guided_decoding_backend": "xgrammar"}, StructuredOutputs(choice=("a", "b"))),
    ({"guided_regex": "x+"}, StructuredOutputs(regex="x+")),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutputs(grammar='root ::= "a"')),
])
def test_each_form_reaches_the_sampling_params(field, expected):
    for parse, base in ((parse_chat, {"messages": CHAT}), (parse_completion, {"prompt": "hi"}),
                        (parse_stream_request, {"prompt": "hi"})):
        assert parse({**base, **field}).sampling_params(3, 100).structured_outputs == expected


@pytest.mark.parametrize("field, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format"),
    ({"response_format": "json"}, "response_format"),  # "must be an object with a type"
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": ["a"]}, "structured_outputs"),
    ({"guided_choice": "ab"}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
])
def test_bad_forms_are_a_400_naming_the_field(field, param):
    with pytest.raises(ApiError) as refused:
        parse_chat({"messages": CHAT, **field})
    assert (refused.value.status, refused.value.param) == (400, param)


# ---- live ------------------------------------------------------------------------------------------------------
async def test_a_chat_held_to_a_json_schema(openai_client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    response = await openai_client.chat.completions.create(
        model="tiny", messages=CHAT, response_format=response_format, max_tokens=60, temperature=0.7, seed=1,
        extra_body=COMPACT)
    choice = response.choices[0]
    person = json.loads(choice.message.content, strict=False)  # xgrammar's strings may hold control characters
    assert choice.finish_reason == "stop" and isinstance(person["ok"], bool) and len(person["name"]) <= 6
    chunks = await openai_client.chat.completions.create(
        model="tiny", messages=CHAT, response_format=response_format, max_tokens=60, temperature=0.7, seed=1,
        extra_body=COMPACT, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert streamed == choice.message.content  # the same seed, streamed


async def test_completions_take_vllms_guided_fields(openai_client):
    choice = await openai_client.completions.create(model="tiny", prompt="hi", max_tokens=20, temperature=0,
                                                    extra_body={"guided_choice": ["red", "green"]})
    assert choice.choices[0].text in ("red", "green") and choice.choices[0].finish_reason == "stop"
    regex = await openai_client.completions.create(model="tiny", prompt="hi", max_tokens=20, temperature=1.0,
                                                   seed=4, n=3, extra_body={"guided_regex": "[0-9]{2}[xy]"})
    assert all(re.fullmatch("[0-9]{2}[xy]", c.text) for c in regex.choices)


async def test_a_spec_that_does_not_compile_is_a_400(openai_client):
    openai = pytest.importorskip("openai")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            await openai_client.completions.create(model="tiny", prompt="hi", max_tokens=5, stream=stream,
                                                   extra_body={"guided_grammar": "root ::= undefined_rule"})
        message = refused.value.body["message"]
        assert refused.value.body["param"] == "guided_grammar"  # the field the client sent
        assert "cannot be compiled" in message and ".cc:" not in message  # no xgrammar log prefix
