"""Response bodies in the OpenAI shapes: completions and chat, whole and as stream chunks.

``ResponseBuilder`` holds what every chunk of one response repeats (id, creation
time, model name, kind) and turns engine outputs into JSON objects.  Every choice
carries vLLM's ``stop_reason``: the stop string or stop token id that ended the
request, else null.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastdecode.actors.api import StreamOutput

MIN_LOGPROB = -9999.0  # what OpenAI and vLLM show for -inf (JSON has no infinity)


@dataclass(frozen=True)
class ResponseBuilder:
    model: str
    is_chat: bool
    token_text: Callable[[int], str]  # the text of one token id, for logprobs
    token_bytes: Callable[[int], bytes] | None = None  # its raw bytes, for chat logprobs; None: its text's
    is_token_id_text: bool = False  # logprob tokens as "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    response_id: str = ""
    created: int = 0

    @classmethod
    def new(cls, model: str, *, is_chat: bool, token_text: Callable[[int], str],
            token_bytes: Callable[[int], bytes] | None = None, is_token_id_text: bool = False) -> "ResponseBuilder":
        prefix = "chatcmpl" if is_chat else "cmpl"
        return cls(model, is_chat, token_text, token_bytes, is_token_id_text, f"{prefix}-{uuid.uuid4().hex}",
                   int(time.time()))

    def _envelope(self, choices: list[dict[str, Any]], *, is_chunk: bool) -> dict[str, Any]:
        if self.is_chat:
            kind = "chat.completion.chunk" if is_chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.response_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    # ---- whole responses ------------------------------------------------------------------------
    def choice(self, outputs: Sequence[StreamOutput], finish_reason: str | None, *, wants_logprobs: bool,
               stop_reason: int | str | None = None, index: int = 0, echo_text: str = "") -> dict[str, Any]:
        """One whole choice of a response from its outputs; its text starts with ``echo_text`` (completions'
        echo: the prompt's)."""
        text = echo_text + "".join(out.text for out in outputs)
        tokens = [out for out in outputs if out.token_id >= 0]
        logprobs = self._logprobs(tokens) if wants_logprobs else None
        if self.is_chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason, "stop_reason": stop_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": stop_reason}

    def complete_choices(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope(choices, is_chunk=False)
        body["usage"] = usage
        return body

    # ---- stream chunks ---------------------------------------------------------------------------
    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        """The first chunk of a chat stream's choice ``index``: the assistant role, no content yet."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None, "stop_reason": None}
        return self._envelope([choice], is_chunk=True)

    def chunk(self, out: StreamOutput, *, wants_logprobs: bool, text_offset: int = 0, index: int = 0,
              echo_text: str = "") -> dict[str, Any]:
        """One stream chunk of choice ``index`` (its ``stop_reason`` is ``out``'s); ``text_offset``: where this
        token's text starts in the completion (the token texts before it, as the non-streamed ``text_offset``
        counts them); ``echo_text``: the prompt's text, which a completion's first chunk starts with (echo)."""
        logprobs = self._logprobs([out], text_offset) if wants_logprobs and out.token_id >= 0 else None
        reason = out.finish_reason
        if self.is_chat:
            delta = {"content": out.text} if out.text or reason is None else {}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                      "stop_reason": out.stop_reason}
        else:
            choice = {"index": index, "text": echo_text + out.text, "logprobs": logprobs, "finish_reason": reason,
                      "stop_reason": out.stop_reason}
        return self._envelope([choice], is_chunk=True)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope([], is_chunk=True)
        body["usage"] = usage
        return body

    # ---- logprobs --------------------------------------------------------------------------------
    def logprob_token(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or ``token_id:<id>`` when the request asked for ids."""
        return f"token_id:{token_id}" if self.is_token_id_text else self.token_text(token_id)

    def _logprobs(self, outputs: Sequence[StreamOutput], text_offset: int = 0) -> dict[str, Any]:
        if self.is_chat:
            return {"content": [self._chat_logprob(out) for out in outputs]}
        tokens = [self.logprob_token(out.token_id) for out in outputs]
        offsets, position = [], text_offset
        for out in outputs:
            offsets.append(position)
            position += len(self.token_text(out.token_id))
        return {
            "tokens": tokens,
            "token_logprobs": [_shown_logprob(out.logprob) for out in outputs],
            "top_logprobs": [self._completion_top(out) for out in outputs],
            "text_offset": offsets,
        }

    def _completion_top(self, out: StreamOutput) -> dict[str, float | None]:
        """The sampled token, then the top ones (as vLLM and OpenAI: up to N + 1 entries)."""
        top = {self.logprob_token(out.token_id): _shown_logprob(out.logprob)}
        for token_id, logprob in out.top_logprobs:
            top.setdefault(self.logprob_token(token_id), _shown_logprob(logprob))
        return top

    def _chat_logprob(self, out: StreamOutput) -> dict[str, Any]:
        def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
            raw = (self.token_bytes(token_id) if self.token_bytes is not None
                   else self.token_text(token_id).encode("utf-8"))
            return {"token": self.logprob_token(token_id), "logprob": _shown_logprob(logprob), "bytes": list(raw)}

        item = entry(out.token_id, out.logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in out.top_logprobs]
        return item


def _shown_logprob(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, MIN_LOGPROB)
