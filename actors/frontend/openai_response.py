"""Response bodies in the OpenAI shapes: completions and chat, whole and as stream chunks.

``ResponseBuilder`` holds what every chunk of one response repeats (id, creation
time, model name, kind) and turns engine outputs into JSON objects.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastdecode.actors.api import StreamOutput

@dataclass(frozen=True)
class ResponseBuilder:
    model: str
    is_chat: bool
    token_text: Callable[[int], str]  # the text of one token id, for logprobs
    response_id: str = ""
    created: int = 0

    @classmethod
    def new(cls, model: str, *, is_chat: bool, token_text: Callable[[int], str]) -> "ResponseBuilder":
        prefix = "chatcmpl" if is_chat else "cmpl"
        return cls(model, is_chat, token_text, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def _envelope(self, choices: list[dict[str, Any]], *, is_chunk: bool) -> dict[str, Any]:
        if self.is_chat:
            kind = "chat.completion.chunk" if is_chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.response_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    # ---- whole responses ------------------------------------------------------------------------
    def complete(self, outputs: Sequence[StreamOutput], finish_reason: str | None, usage: dict[str, Any],
                 *, wants_logprobs: bool) -> dict[str, Any]:
        text = "".join(out.text for out in outputs)
        tokens = [out for out in outputs if out.token_id >= 0]
        logprobs = self._logprobs(tokens) if wants_logprobs else None
        if self.is_chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        body = self._envelope([choice], is_chunk=False)
        body["usage"] = usage
        return body

    # ---- stream chunks ---------------------------------------------------------------------------
    def role_chunk(self) -> dict[str, Any]:
        """The first chunk of a chat stream: the assistant role, no content yet."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return self._envelope([choice], is_chunk=True)

    def chunk(self, out: StreamOutput, *, wants_logprobs: bool, text_offset: int = 0) -> dict[str, Any]:
        """One stream chunk; ``text_offset``: where this token's text starts in the completion (the token
        texts before it, as the non-streamed ``text_offset`` counts them)."""
        logprobs = self._logprobs([out], text_offset) if wants_logprobs and out.token_id >= 0 else None
        reason = out.finish_reason
        if self.is_chat:
            delta = {"content": out.text} if out.text or reason is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope([choice], is_chunk=True)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope([], is_chunk=True)
        body["usage"] = usage
        return body

    # ---- logprobs --------------------------------------------------------------------------------
    def _logprobs(self, outputs: Sequence[StreamOutput], text_offset: int = 0) -> dict[str, Any]:
        if self.is_chat:
            return {"content": [self._chat_logprob(out) for out in outputs]}
        tokens = [self.token_text(out.token_id) for out in outputs]
        offsets, position = [], text_offset
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [out.logprob for out in outputs],
            "top_logprobs": [{self.token_text(t): lp for t, lp in out.top_logprobs} for out in outputs],
            "text_offset": offsets,
        }

    def _chat_logprob(self, out: StreamOutput) -> dict[str, Any]:
        def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        item = entry(out.token_id, out.logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in out.top_logprobs]
        return item
