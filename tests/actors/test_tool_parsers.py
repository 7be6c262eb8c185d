"""The tool-call extractors (``tool_parsers``): what each finds in a whole text, and that any split of the text
into stream pieces gives the same content and calls (a streamed choice shows what the whole one shows)."""
from __future__ import annotations

import json

import pytest

from fastdecode.actors.tool_parsers import (
    Extractor,
    HermesCalls,
    Llama3JsonCalls,
    NamedCall,
    RequiredCalls,
    ToolDelta,
    merge_calls,
    read_whole,
)
from text_splits import cut_lists

PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
CALL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def extract(extractor: Extractor, text: str) -> tuple[str, list[dict]]:
    """The content and whole calls of a whole text, as the server reads a whole response."""
    delta = read_whole(extractor, text)
    return delta.content, merge_calls(delta.calls)


def shown(content: str, calls: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in calls)
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def streamed(make, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    """The content and calls a stream of ``text`` cut at ``cuts`` shows, merged as a client merges deltas."""
    extractor, delta, bounds = make(), ToolDelta(), [0, *cuts, len(text)]
    for start, end in zip(bounds, bounds[1:]):
        delta += extractor.feed(text[start:end])
    delta += extractor.finish()
    calls: dict[int, dict] = {}
    for part in delta.calls:
        if part["index"] not in calls:  # a call's first delta names it, the rest add arguments
            calls[part["index"]] = {"id": part["id"], "type": part["type"],
                                    "function": {"name": part["function"]["name"], "arguments": ""}}
        else:
            assert set(part) == {"index", "function"} and "name" not in part["function"]
        calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return shown(delta.content, [calls[i] for i in sorted(calls)])


CASES = [
    # (extractor, text, content, [(name, arguments)])
    (HermesCalls, "Let me check.\n<tool_call>\n" + PARIS + "\n</tool_call>",
     "Let me check.\n", [("get_weather", '{"city": "Paris"}')]),
    (HermesCalls, f"<tool_call>{PARIS}</tool_call>\n<tool_call>" + '{"name": "f"}</tool_call>\n',
     "", [("get_weather", '{"city": "Paris"}'), ("f", "{}")]),
    (HermesCalls, "plain text, a < sign and <tool_ca", "plain text, a < sign and <tool_ca", []),
    (HermesCalls, "<tool_call>not json</tool_call> rest", "<tool_call>not json</tool_call> rest", []),
    (HermesCalls, f"<tool_call>{PARIS}", "", [("get_weather", '{"city": "Paris"}')]),  # cut before its end tag
    (HermesCalls, '<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>', "", [("f", '{"x": 1}')]),
    (HermesCalls, f"<tool_call>{PARIS}</tool_call> and more", " and more", [("get_weather", '{"city": "Paris"}')]),
    (HermesCalls, f"A <tool_call>{PARIS}</tool_call> B <tool_call>{PARIS}</tool_call> C", "A  B  C",
     [("get_weather", '{"city": "Paris"}')] * 2),  # the space before a call is kept, streamed too
    (HermesCalls, '<tool_call>{"name": "é", "arguments": {"q": "ü"}}</tool_call>', "", [("é", '{"q": "ü"}')]),
    (Llama3JsonCalls, PARIS, "", [("get_weather", '{"city": "Paris"}')]),
    (Llama3JsonCalls, ' <|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}}',
     "", [("a", '{"x": 1}'), ("b", "{}")]),
    (Llama3JsonCalls, "The weather is fine.", "The weather is fine.", []),
    (Llama3JsonCalls, '{"answer": 42}', '{"answer": 42}', []),  # JSON, but no call
    (Llama3JsonCalls, '{"name": "a", "arguments": {"x": ', '{"name": "a", "arguments": {"x": ', []),  # cut
    (Llama3JsonCalls, PARIS + " That is all.", "That is all.", [("get_weather", '{"city": "Paris"}')]),
    (RequiredCalls, '[{"name": "a", "parameters": {"s": "}]\\"{"}}, {"name": "b", "parameters": {}}]',
     "", [("a", '{"s": "}]\\"{"}'), ("b", "{}")]),
    (RequiredCalls, '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "par',
     '{"name": "b", "par', [("a", '{"x": 1}')]),  # cut by max_tokens: the open call is content
    (RequiredCalls, '[{"name": "a", "par', '[{"name": "a", "par', []),
    (RequiredCalls, '[{"x": 1}, {"name": "a", "parameters": {"s": "\x0e"}}]', '{"x": 1}',
     [("a", '{"s": "\\u000e"}')]),  # strict JSON out
    (RequiredCalls, '[{"x": 1}]', '[{"x": 1}]', []),
    (HermesCalls, '<tool_call>{"name": "a", "arguments": {"s": "\x0e"}}</tool_call>', "",
     [("a", '{"s": "\\u000e"}')]),
]


@pytest.mark.parametrize("make, text, content, calls", CASES)
def test_a_whole_text(make, text, content, calls):
    assert shown(*extract(make(), text)) == (content, calls)


@pytest.mark.parametrize("make, text, content, calls", CASES)
def test_every_split_shows_what_the_whole_text_shows(make, text, content, calls):
    for cuts in cut_lists(text, num_random=50, max_pieces=12, is_char_by_char=True):
        assert streamed(make, text, cuts) == (content, calls), cuts


def test_content_before_a_hermes_call_streams_before_the_call_closes():
    extractor = HermesCalls()
    assert extractor.feed("Sure, ").content == "Sure, "
    assert extractor.feed("here <tool").content == "here "  # the tag's start is held back
    delta = extractor.feed('_call>{"name": "f", "argum')
    assert (delta.content, delta.calls) == ("", [])
    delta = extractor.feed('ents": {}}</tool_call>')
    assert delta.calls[0]["function"] == {"name": "f", "arguments": "{}"}


def test_prose_after_llama3_calls_streams_as_it_comes():
    extractor = Llama3JsonCalls()
    assert extractor.feed(PARIS).calls and extractor.feed(" Done").content == "Done"
    assert extractor.feed(", thanks.").content == ", thanks."


def test_a_named_call_streams_its_arguments_as_they_come():
    extractor = NamedCall("get_weather")
    first = extractor.feed('{"city"')
    assert first.calls[0]["function"] == {"name": "get_weather", "arguments": '{"city"'} and first.calls[0]["id"]
    assert extractor.feed(': "Paris"}').calls == [{"index": 0, "function": {"arguments": ': "Paris"}'}}]
    assert extractor.finish().calls == []
    assert shown(*extract(NamedCall("f"), "")) == ("", [("f", "")])  # nothing written: the call, empty


@pytest.mark.parametrize("make, text", [
    (HermesCalls, f"<tool_call>{PARIS}</tool_call><tool_call>" + '{"name": "f"}</tool_call>'),
    (Llama3JsonCalls, PARIS + '; {"name": "f", "arguments": {}}'),
    (RequiredCalls, '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "f", "parameters": {}}]'),
])
def test_without_parallel_calls_only_the_first_is_kept(make, text):
    assert shown(*extract(make(is_parallel=False), text)) == ("", [("get_weather", '{"city": "Paris"}')])
    assert len(extract(make(), text)[1]) == 2


def test_each_call_has_its_own_id():
    _, calls = extract(HermesCalls(), f"<tool_call>{PARIS}</tool_call><tool_call>{PARIS}</tool_call>")
    assert len({c["id"] for c in calls}) == 2
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("make", [HermesCalls, Llama3JsonCalls, RequiredCalls])
def test_json_nested_past_the_decoders_depth_is_content_not_a_crash(make):
    deep = '{"a": ' * 3000 + "1" + "}" * 3000
    text = {HermesCalls: f"<tool_call>{deep}</tool_call>", Llama3JsonCalls: deep, RequiredCalls: f"[{deep}]"}[make]
    content, calls = extract(make(), text)
    assert calls == [] and content == text
