"""Tool calls found in a chat choice's text, as vLLM's tool parsers find them.

Each extractor reads one choice's text as it comes (``feed``) and once it has ended (``finish``); each call returns
a ``ToolDelta``: the content to show and the tool-call deltas of OpenAI's stream (``{"index", "id", "type",
"function": {"name", "arguments"}}``, the id, type and name in a call's first delta only).  A whole response feeds
the whole text (``read_whole``), so a streamed choice and a whole one show the same calls and content.

- ``NamedCall``: the text is the arguments of the one function ``tool_choice`` names (structured outputs held it to
  the function's parameters); its argument fragments stream as they come.
- ``RequiredCalls``: the text is a JSON array of ``{"name", "parameters"}`` objects (``tool_choice: "required"``);
  each call is sent once its object is complete.
- ``HermesCalls`` (``--tool-call-parser hermes``: Hermes, Qwen 2.5 and later): calls are ``<tool_call>{"name",
  "arguments"}</tool_call>`` blocks (``parameters`` taken for ``arguments``, as some models write it); the text
  around them is content, but the whitespace right after a block. A block whose JSON is not a call stays content,
  tags and all.
- ``Llama3JsonCalls`` (``--tool-call-parser llama3_json``: Llama 3.1 and later's JSON tool calling): a text that
  starts (after whitespace) with ``{`` or ``<|python_tag|>`` is calls, JSON objects with ``name`` and ``arguments``
  (or ``parameters``) separated by ``;``; each call is sent once its object is complete, and what does not parse as
  one is content (the whitespace and ``;`` between a call and text after it are not).

With ``is_parallel`` false (the request's ``parallel_tool_calls``), the calls after the first are dropped, as vLLM
drops them.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

PARSERS = ("hermes", "llama3_json")  # --tool-call-parser's choices


@dataclass
class ToolDelta:
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str = ""  # a reasoning model's thinking (``reasoning_parsers``), where it is split off

    def __iadd__(self, other: "ToolDelta") -> "ToolDelta":
        self.content += other.content
        self.calls += other.calls
        self.reasoning += other.reasoning
        return self


class Extractor(Protocol):
    def feed(self, text: str) -> ToolDelta: ...

    def finish(self) -> ToolDelta: ...


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's form


def read_whole(reader: Extractor, text: str) -> ToolDelta:
    """What a reader (an extractor, or ``choice_text.ChoiceReader``) shows of a whole text: a whole response is the
    stream's reading of one piece, so both show the same."""
    delta = reader.feed(text)
    delta += reader.finish()
    return delta


def merge_calls(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole calls from their stream deltas, in index order (a call's arguments joined)."""
    calls: dict[int, dict[str, Any]] = {}
    for part in parts:
        call = calls.get(part["index"])
        if call is None:
            calls[part["index"]] = {"id": part["id"], "type": "function",
                                    "function": {"name": part["function"]["name"], "arguments": ""}}
            call = calls[part["index"]]
        call["function"]["arguments"] += part["function"]["arguments"]
    return [calls[index] for index in sorted(calls)]


class _Calls:
    """Numbers the calls an extractor completes, dropping those past the first unless ``is_parallel``."""

    def __init__(self, is_parallel: bool) -> None:
        self.is_parallel = is_parallel
        self.num_calls = 0

    def whole(self, name: str, arguments: Any) -> list[dict[str, Any]]:
        """The delta of one complete call (its arguments as JSON text, non-ASCII kept as vLLM keeps it)."""
        index, self.num_calls = self.num_calls, self.num_calls + 1
        if index > 0 and not self.is_parallel:
            return []
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return [{"index": index, "id": make_tool_call_id(), "type": "function",
                 "function": {"name": name, "arguments": text}}]


def _as_call(value: Any, arguments_keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """``(name, arguments)`` of a decoded call object (arguments ``{}`` where none are given), else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments: Any = {}
    for key in arguments_keys:
        if value.get(key) is not None:
            arguments = value[key]
            break
    return value["name"], arguments


class NamedCall:
    """The text is the named function's arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._id: str | None = None

    def feed(self, text: str) -> ToolDelta:
        if not text:
            return ToolDelta()
        return ToolDelta(calls=[self._part(text)])

    def finish(self) -> ToolDelta:
        return ToolDelta() if self._id is not None else ToolDelta(calls=[self._part("")])

    def _part(self, arguments: str) -> dict[str, Any]:
        if self._id is None:
            self._id = make_tool_call_id()
            return {"index": 0, "id": self._id, "type": "function",
                    "function": {"name": self.name, "arguments": arguments}}
        return {"index": 0, "function": {"arguments": arguments}}


class RequiredCalls:
    """A JSON array of ``{"name", "parameters"}`` objects; each object is a call once it closes."""

    def __init__(self, is_parallel: bool = True) -> None:
        self._calls = _Calls(is_parallel)
        self._text = ""
        self._scanned = 0
        self._depth = 0
        self._in_string = self._escaped = False
        self._element_start: int | None = None  # where the array's open element starts
        self._not_calls: list[str] = []  # closed elements that are not calls: content at the finish

    def feed(self, text: str) -> ToolDelta:
        self._text += text
        delta = ToolDelta()
        for position in range(self._scanned, len(self._text)):
            char = self._text[position]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "[{":
                self._depth += 1
                if self._depth == 2:
                    self._element_start = position
            elif char in "]}":
                self._depth -= 1
                if self._depth == 1 and self._element_start is not None:
                    delta += self._element(self._text[self._element_start:position + 1])
                    self._element_start = None
        self._scanned = len(self._text)
        return delta

    def finish(self) -> ToolDelta:
        """Closed elements that are not calls and what did not close (a text cut by max_tokens) are content, or the
        whole text where no call was found: nothing the model wrote is lost."""
        if self._calls.num_calls == 0:
            return ToolDelta(content=self._text)
        rest = [self._text[self._element_start:]] if self._element_start is not None else []
        return ToolDelta(content=" ".join(self._not_calls + rest))

    def _element(self, text: str) -> ToolDelta:
        try:
            call = _as_call(json.loads(text, strict=False), ("parameters",))
        except (ValueError, RecursionError):  # not JSON, or nested past what the decoder takes
            call = None
        if call is None:
            self._not_calls.append(text)
            return ToolDelta()
        return ToolDelta(calls=self._calls.whole(*call))


class HermesCalls:
    """``<tool_call>{...}</tool_call>`` blocks; the text around them is content."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, is_parallel: bool = True) -> None:
        self._calls = _Calls(is_parallel)
        self._pending = ""  # text not shown yet: a possible start tag's beginning, or an open block
        self._in_call = False
        self._held_space = ""  # whitespace right after a call, shown only if text follows
        self._is_after_call = False  # nothing but whitespace since the last call

    def feed(self, text: str) -> ToolDelta:
        # an open block's end tag is looked for in the new text only (and the tag's length before it), not again
        # over the whole block at every token
        search_from = max(0, len(self._pending) - len(self.END) + 1)
        self._pending += text
        delta = ToolDelta()
        while True:
            if self._in_call:
                end = self._pending.find(self.END, search_from)
                search_from = 0
                if end < 0:
                    return delta
                delta += self._block(self._pending[:end], is_closed=True)
                self._pending = self._pending[end + len(self.END):]
                self._in_call = False
                continue
            start = self._pending.find(self.START)
            if start >= 0:
                delta.content += self._content(self._pending[:start])
                self._pending = self._pending[start + len(self.START):]
                self._in_call = True
                continue
            kept = partial_suffix(self._pending, self.START)
            delta.content += self._content(self._pending[:len(self._pending) - kept])
            self._pending = self._pending[len(self._pending) - kept:]
            return delta

    def finish(self) -> ToolDelta:
        """An open block that parses is a call (vLLM takes one cut before its end tag too); else it is content."""
        pending, self._pending = self._pending, ""
        if self._in_call:
            self._in_call = False
            return self._block(pending, is_closed=False)
        return ToolDelta(content=self._content(pending))

    def _content(self, text: str) -> str:
        if not self._is_after_call:
            return text
        text, self._held_space = self._held_space + text, ""
        if text.strip():
            self._is_after_call = False
            return text
        self._held_space = text
        return ""

    def _block(self, body: str, *, is_closed: bool) -> ToolDelta:
        try:
            call = _as_call(json.loads(body, strict=False), ("arguments", "parameters"))
        except (ValueError, RecursionError):  # not JSON, or nested past what the decoder takes
            call = None
        if call is None:
            return ToolDelta(content=self._content(self.START + body + (self.END if is_closed else "")))
        self._held_space, self._is_after_call = "", True
        return ToolDelta(calls=self._calls.whole(*call))


class Llama3JsonCalls:
    """A text that starts with ``{`` or ``<|python_tag|>`` is ``;``-separated JSON call objects."""

    TAG = "<|python_tag|>"

    def __init__(self, is_parallel: bool = True) -> None:
        self._calls = _Calls(is_parallel)
        self._mode: str | None = None  # None: not known yet; "calls"; "content"
        self._text = ""  # the calls' text
        self._position = 0  # where the next call object starts in it
        self._decoder = json.JSONDecoder(strict=False)  # xgrammar's strings may hold control characters

    def feed(self, text: str) -> ToolDelta:
        if self._mode == "content":
            return ToolDelta(content=text)
        self._text += text
        if self._mode is None:
            head = self._text.lstrip()
            if not head or (self.TAG.startswith(head) and head != self.TAG):
                return ToolDelta()  # not known yet
            if head.startswith("{") or head.startswith(self.TAG):
                self._mode = "calls"
                self._position = len(self._text) - len(head) + (len(self.TAG) if head.startswith(self.TAG) else 0)
            else:
                self._mode = "content"
                text, self._text = self._text, ""
                return ToolDelta(content=text)
        # an object may have closed, or prose follows the calls
        position = _skip_separators(self._text, self._position)
        if "}" in text or (position < len(self._text) and self._text[position] != "{"):
            return self._decoded()
        return ToolDelta()

    def finish(self) -> ToolDelta:
        delta = self._decoded()
        text, rest = self._text, self._text[self._position:]
        self._text, self._position = "", 0
        if self._mode == "content":
            return delta
        if self._calls.num_calls == 0:
            return ToolDelta(content=text)  # no call in it: the text as written
        if rest.strip(" \t\r\n;"):
            delta.content += rest
        return delta

    def _decoded(self) -> ToolDelta:
        delta = ToolDelta()
        while self._mode == "calls":
            position = _skip_separators(self._text, self._position)
            if position == len(self._text):
                return delta
            if self._text[position] != "{":
                self._mode = "content"  # prose after the calls (or after the tag: the text as written)
                delta.content += self._text[position:] if self._calls.num_calls else self._text
                self._text, self._position = "", 0
                return delta
            try:
                value, end = self._decoder.raw_decode(self._text, position)
            except (ValueError, RecursionError):
                return delta  # not complete yet (or not JSON, or nested too deeply: content at the finish)
            call = _as_call(value, ("arguments", "parameters"))
            if call is None:
                return delta  # JSON but not a call: content at the finish
            delta.calls += self._calls.whole(*call)
            self._position = end
        return delta


def _skip_separators(text: str, position: int) -> int:
    """Where the next call object may start: ``position`` past whitespace and ``;``."""
    while position < len(text) and text[position] in " \t\r\n;":
        position += 1
    return position


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (held back: the tag may be arriving)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
