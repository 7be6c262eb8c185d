"""A reasoning model's thinking split from its answer, as vLLM's reasoning parsers split it
(``--reasoning-parser``): the text inside ``<think>...</think>`` is reasoning, the text after it content.

- ``deepseek_r1`` (DeepSeek-R1 and its Llama and Qwen distills, whose chat template opens the ``<think>`` block in
  the prompt): the text up to ``</think>`` is reasoning, a leading ``<think>`` dropped; a text that never closes
  the block is all reasoning.
- ``qwen3`` (Qwen3, QwQ): a text that starts with ``<think>`` reasons up to ``</think>``; any other text (thinking
  turned off) is all content.

``ThinkSplit`` reads one choice's text as it comes (``feed``) and at its end (``finish``), each returning the
``(reasoning, content)`` pieces to show; a tag split between pieces is held back until it is known.

As vLLM's, a structured output (a schema, a named or required tool call) holds the answer, not the thinking:
``grammar_start_token`` is the token after which it starts (``SamplingParams.reasoning_end_token_id``), where the
tags are tokens of the model's vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastdecode.actors.tool_parsers import partial_suffix

REASONING_PARSERS = ("deepseek_r1", "qwen3")  # --reasoning-parser's choices


class ThinkSplit:
    START, END = "<think>", "</think>"

    def __init__(self, parser: str, prompt_thinking: str | None = None) -> None:
        """``prompt_thinking``: where the prompt left the thinking (``prompt_thinking``): "open" (its template
        opened the block: the text starts in it), "closed" (it closed it: the text is the answer), None (no tag in
        the prompt: the parser's rule)."""
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}: this server has {', '.join(REASONING_PARSERS)}")
        self._is_open_by_default = parser == "deepseek_r1"  # R1's template opens the block in the prompt
        self._state = {"open": "reasoning", "closed": "content"}.get(prompt_thinking or "", "head")
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        reasoning = content = ""
        if self._state == "head":
            head = self._held.lstrip()
            if self.START.startswith(head) and head != self.START:
                return "", ""  # nothing yet, or the start tag arriving
            if head.startswith(self.START):
                self._state, self._held = "reasoning", head[len(self.START):]
            else:
                self._state = "reasoning" if self._is_open_by_default else "content"
        if self._state == "reasoning":
            end = self._held.find(self.END)
            if end < 0:
                kept = partial_suffix(self._held, self.END)
                reasoning, self._held = self._held[:len(self._held) - kept], self._held[len(self._held) - kept:]
                return reasoning, ""
            reasoning, self._held = self._held[:end], self._held[end + len(self.END):]
            self._state = "content"
        content, self._held = self._held, ""
        return reasoning, content

    @property
    def is_thinking(self) -> bool:
        """The text so far is in the thinking (or, before the start tag is known, would be if no tag came)."""
        return self._state == "reasoning" or (self._state == "head" and self._is_open_by_default)

    def finish(self) -> tuple[str, str]:
        """What was held back: a partial tag is text of the part it is in."""
        held, self._held = self._held, ""
        return (held, "") if self.is_thinking else ("", held)


def think_tag_ids(tokenizer: Any) -> tuple[int | None, int] | None:
    """The ids of the ``<think>`` and ``</think>`` tokens (None where the end tag is no single token: a model that
    does not think in tags)."""
    start_id, end_id = (tokenizer.convert_tokens_to_ids(tag) for tag in (ThinkSplit.START, ThinkSplit.END))
    return None if end_id is None else (start_id, end_id)


def prompt_thinking(tokenizer: Any, prompt_ids: Sequence[int]) -> str | None:
    """Where the prompt leaves the thinking: "open" (its last think tag is ``<think>``: QwQ's and R1's templates),
    "closed" (``</think>``: Qwen3's template with ``enable_thinking: false``), or None (no tag, or the tags are no
    tokens of this vocabulary)."""
    ids = think_tag_ids(tokenizer)
    if ids is None:
        return None
    start_id, end_id = ids
    for token_id in reversed(prompt_ids):
        if token_id == end_id:
            return "closed"
        if token_id == start_id:
            return "open"
    return None


def grammar_start_token(tokenizer: Any, prompt_ids: Sequence[int]) -> int | None:
    """The token a structured output starts after: ``</think>``, unless the prompt has closed the thinking already
    or the tags are no tokens of this vocabulary (None: it holds from the first token)."""
    ids = think_tag_ids(tokenizer)
    if ids is None or prompt_thinking(tokenizer, prompt_ids) == "closed":
        return None
    return ids[1]

