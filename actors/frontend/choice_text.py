"""How the chat route shows a choice's text when the server parses it: a reasoning model's thinking split off
(``--reasoning-parser``, shown as ``reasoning_content``), and in what is left the tool calls the request asks for
(``tool_fields``), as vLLM finds tool calls in the content alone. One ``ChoiceReader`` per choice reads its text as
it streams (``feed``, ``finish``); a whole response is the same reader fed the whole text (``ChoiceParsing.message``),
so both show the same reasoning, content and calls."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastdecode.actors.frontend.tool_fields import ToolCalling
from fastdecode.actors.reasoning_parsers import ThinkSplit, prompt_thinking
from fastdecode.actors.tool_parsers import Extractor, ToolDelta, merge_calls, read_whole


@dataclass(frozen=True)
class ChoiceParsing:
    """What a chat request's choices are parsed for: ``tool_calling`` (None: no calls) and the server's
    ``reasoning_parser`` (None: no split); ``is_reasoning_shown`` false (the request's ``include_reasoning``) drops
    the reasoning."""

    tool_calling: ToolCalling | None = None
    reasoning_parser: str | None = None
    is_reasoning_shown: bool = True
    prompt_thinking: str | None = None  # where the choice's prompt left the thinking (reasoning_parsers)

    def for_prompt(self, tokenizer: Any, prompt_ids: Sequence[int]) -> "ChoiceParsing":
        """This parsing for a choice of ``prompt_ids``: its text starts in the thinking or in the answer as the
        prompt left it (the grammar of a structured output starts where the same prompt says: generation.py)."""
        if self.reasoning_parser is None:
            return self
        return dataclasses.replace(self, prompt_thinking=prompt_thinking(tokenizer, prompt_ids))

    def reader(self) -> "ChoiceReader":
        return ChoiceReader(self)

    def message(self, text: str, role: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole choice's message, and its finish reason: "tool_calls" where an auto or required choice called,
        as vLLM's ("stop" for a named call). A named or required call's content is what is not a call ("", as
        vLLM's, when all is), auto's the text around the calls (null when none is left); with a reasoning parser,
        content left empty is null (but a named or required call's) and ``reasoning_content`` (and vLLM's newer
        ``reasoning``) holds the thinking, null where there was none."""
        reader = self.reader()
        delta = read_whole(reader, text)
        calls = merge_calls(delta.calls)
        content: str | None = delta.content
        is_forced = self.tool_calling is not None and not self.tool_calling.is_auto  # named or required: "" kept
        if not is_forced and (calls or self.reasoning_parser):
            content = content or None
        message: dict[str, Any] = {"role": role, "content": content, "tool_calls": calls}
        if self.reasoning_parser is not None:
            message["reasoning_content"] = message["reasoning"] = delta.reasoning or None
        return message, ("tool_calls" if reader.ends_as_tool_calls else finish_reason)


class ChoiceReader:
    def __init__(self, parsing: ChoiceParsing) -> None:
        self._split = (ThinkSplit(parsing.reasoning_parser, parsing.prompt_thinking)
                       if parsing.reasoning_parser is not None else None)
        tool_calling = parsing.tool_calling
        self._tools: Extractor | None = tool_calling.extractor() if tool_calling is not None else None
        # vLLM's: a choice that called through "auto" or "required" ends as "tool_calls", a named call as "stop"
        self._is_ended_by_calls = tool_calling is not None and tool_calling.choice in ("auto", "required")
        self._is_reasoning_shown = parsing.is_reasoning_shown
        self.ends_as_tool_calls = False

    @property
    def is_thinking(self) -> bool:
        """The text read so far ends in the thinking (a token read then counts as a reasoning token)."""
        return self._split is not None and self._split.is_thinking

    def feed(self, text: str) -> ToolDelta:
        reasoning, content = self._split.feed(text) if self._split is not None else ("", text)
        return self._delta(reasoning, content, is_end=False)

    def finish(self) -> ToolDelta:
        reasoning, content = self._split.finish() if self._split is not None else ("", "")
        return self._delta(reasoning, content, is_end=True)

    def _delta(self, reasoning: str, content: str, *, is_end: bool) -> ToolDelta:
        if self._tools is None:
            delta = ToolDelta(content=content)
        else:
            delta = self._tools.feed(content) if content else ToolDelta()
            if is_end:
                delta += self._tools.finish()
        delta.reasoning = reasoning if self._is_reasoning_shown else ""
        self.ends_as_tool_calls |= self._is_ended_by_calls and bool(delta.calls)
        return delta
