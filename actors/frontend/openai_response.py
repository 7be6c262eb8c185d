"""Response bodies in the OpenAI shapes: completions and chat, whole and as stream chunks.

``ResponseBuilder`` holds what every chunk of one response repeats (id, creation
time, model name, kind) and turns engine outputs into JSON objects.  Every choice
carries vLLM's ``stop_reason``: the stop string or stop token id that ended the
request, else null.  A request that asked for the prompt's logprobs (vLLM's
``prompt_logprobs``, or completions' echo with logprobs) gets them in vLLM's shape:
on each completions choice, or once on a chat response; an echo's ``logprobs``
cover the prompt's tokens first.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastdecode.actors.api import StreamOutput, prompt_logprob_dicts
from fastdecode.actors.frontend.choice_text import ChoiceParsing
from fastdecode.actors.tool_parsers import ToolDelta
from fastdecode.actors.request import PromptLogprob

MIN_LOGPROB = -9999.0  # what OpenAI and vLLM show for -inf (JSON has no infinity)
# one echoed prompt token in a completion's logprobs: (token id, its logprob, the top (id, logprob) pairs); the
# first prompt token's logprob and top are None
EchoStep = tuple[int, float | None, Sequence[tuple[int, float]] | None]


@dataclass(frozen=True)
class ResponseBuilder:
    model: str
    is_chat: bool
    token_text: Callable[[int], str]  # the text of one token id, for logprobs
    token_bytes: Callable[[int], bytes] | None = None  # its raw bytes, for chat logprobs; None: its text's
    is_token_id_text: bool = False  # logprob tokens as "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    num_logprobs: int | None = None  # the request's logprobs (None: none asked); top tokens an echoed token shows
    response_id: str = ""
    created: int = 0
    role: str = "assistant"  # a chat message's (vLLM's --response-role)
    # A completion stream's choice index -> where its next token's text starts (its logprobs' text_offset).
    _next_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def wants_logprobs(self) -> bool:
        return self.num_logprobs is not None

    @classmethod
    def new(cls, model: str, *, is_chat: bool, token_text: Callable[[int], str],
            token_bytes: Callable[[int], bytes] | None = None, is_token_id_text: bool = False,
            num_logprobs: int | None = None, role: str = "assistant") -> "ResponseBuilder":
        prefix = "chatcmpl" if is_chat else "cmpl"
        return cls(model, is_chat, token_text, token_bytes, is_token_id_text, num_logprobs,
                   f"{prefix}-{uuid.uuid4().hex}", int(time.time()), role)

    def _envelope(self, choices: list[dict[str, Any]], *, is_chunk: bool) -> dict[str, Any]:
        if self.is_chat:
            kind = "chat.completion.chunk" if is_chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.response_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    # ---- whole responses ------------------------------------------------------------------------
    def choice(self, outputs: Sequence[StreamOutput], finish_reason: str | None, *,
               stop_reason: int | str | None = None, index: int = 0, echo_text: str | None = None,
               prompt_ids: Sequence[int] = (), parsing: ChoiceParsing | None = None) -> dict[str, Any]:
        """One whole choice of a response from its outputs; its text starts with ``echo_text`` (completions'
        echo: the prompt's), its logprobs with those of the prompt's tokens ``prompt_ids`` (where the first output
        carries them).  A chat choice leaves the prompt's logprobs to the response (``complete_choices``), and
        shows its text as ``parsing`` reads it (reasoning, tool calls: ``ChoiceParsing.message``)."""
        text = (echo_text or "") + "".join(out.text for out in outputs)
        tokens = [out for out in outputs if out.token_id >= 0]
        if self.is_chat:
            logprobs = self._logprobs(tokens)[0] if self.wants_logprobs else None
            message: dict[str, Any] = {"role": self.role, "content": text, "tool_calls": []}
            if parsing is not None:
                message, finish_reason = parsing.message(text, self.role, finish_reason)
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
                    "stop_reason": stop_reason}
        prompt_logprobs = outputs[0].prompt_logprobs if outputs else None
        echoed = self._echoed(prompt_ids, prompt_logprobs) if echo_text is not None else []
        logprobs = self._logprobs(tokens, echoed=echoed)[0] if self.wants_logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": stop_reason, "prompt_logprobs": self.prompt_logprobs(prompt_ids, prompt_logprobs)}

    def complete_choices(self, choices: list[dict[str, Any]], usage: dict[str, Any], *,
                         prompt_logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
        """The whole response; a chat one carries its prompt's ``prompt_logprobs`` (vLLM's, once per response)."""
        body = self._envelope(choices, is_chunk=False)
        if self.is_chat:
            body["prompt_logprobs"] = prompt_logprobs
        body["usage"] = usage
        return body

    def prompt_logprobs(self, prompt_ids: Sequence[int],
                        prompt_logprobs: Sequence[PromptLogprob | None] | None) -> list[dict[str, Any] | None] | None:
        """vLLM's ``prompt_logprobs``: null for the first prompt token, then per prompt token an object of token ids
        (the token's, then the most likely ones') to ``{logprob, rank, decoded_token}``; null where none were asked."""
        if prompt_logprobs is None:
            return None
        return [None if position is None else
                {str(token_id): {"logprob": _shown_logprob(lp.logprob), "rank": lp.rank,
                                 "decoded_token": lp.decoded_token} for token_id, lp in position.items()}
                for position in prompt_logprob_dicts(prompt_ids, prompt_logprobs, self.token_text)]

    # ---- stream chunks ---------------------------------------------------------------------------
    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        """The first chunk of a chat stream's choice ``index``: the assistant role, no content yet."""
        choice = {"index": index, "delta": {"role": self.role, "content": ""}, "logprobs": None,
                  "finish_reason": None, "stop_reason": None}
        return self._envelope([choice], is_chunk=True)

    def chunk(self, out: StreamOutput, *, index: int = 0, echo_text: str | None = None,
              prompt_ids: Sequence[int] = (), tool_delta: ToolDelta | None = None,
              finish_reason: str | None = None) -> dict[str, Any]:
        """The next stream chunk of choice ``index`` (its ``stop_reason`` is ``out``'s); ``echo_text``: the prompt's
        text, which a completion's first chunk starts with (echo), its logprobs with those of the prompt's tokens
        ``prompt_ids``. A completion's logprobs count text_offset from the choice's earlier chunks, as the
        non-streamed response counts it. A chat choice whose text is parsed (``ChoiceReader``) shows ``tool_delta``
        (its reasoning, content and tool-call deltas) instead of ``out``'s text, and ends with ``finish_reason``
        (else ``out``'s)."""
        echoed = self._echoed(prompt_ids, out.prompt_logprobs) if echo_text is not None else []
        tokens = [out] if out.token_id >= 0 else []
        logprobs = None
        if self.wants_logprobs and (tokens or echoed):
            logprobs, self._next_offsets[index] = self._logprobs(tokens, self._next_offsets.get(index, 0),
                                                                 echoed=echoed)
        reason = finish_reason or out.finish_reason
        if self.is_chat:
            if tool_delta is None:
                delta: dict[str, Any] = {"content": out.text} if out.text or reason is None else {}
            else:
                delta = {"content": tool_delta.content} if tool_delta.content else {}
                if tool_delta.reasoning:
                    delta["reasoning_content"] = delta["reasoning"] = tool_delta.reasoning
                if tool_delta.calls:
                    delta["tool_calls"] = tool_delta.calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                      "stop_reason": out.stop_reason}
        else:
            choice = {"index": index, "text": (echo_text or "") + out.text, "logprobs": logprobs,
                      "finish_reason": reason, "stop_reason": out.stop_reason}
        return self._envelope([choice], is_chunk=True)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope([], is_chunk=True)
        body["usage"] = usage
        return body

    # ---- logprobs --------------------------------------------------------------------------------
    def logprob_token(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or ``token_id:<id>`` when the request asked for ids."""
        return f"token_id:{token_id}" if self.is_token_id_text else self.token_text(token_id)

    def _echoed(self, prompt_ids: Sequence[int], prompt_logprobs: Sequence[PromptLogprob | None] | None,
                ) -> list[EchoStep]:
        """An echo's prompt tokens as steps of a completion's logprobs, their top tokens no more than the request's
        logprobs (the engine made ``prompt_logprobs`` of them); none where the prompt's logprobs did not come."""
        if prompt_logprobs is None:
            return []
        return [(token_id, None, None) if entry is None
                else (token_id, entry.logprob, entry.top_logprobs if self.num_logprobs == -1
                      else entry.top_logprobs[:self.num_logprobs or 0])
                for token_id, entry in zip(prompt_ids, prompt_logprobs)]

    def _logprobs(self, outputs: Sequence[StreamOutput], text_offset: int = 0, *,
                  echoed: Sequence[EchoStep] = ()) -> tuple[dict[str, Any], int]:
        """The logprobs object of ``outputs`` and where the text after them starts; a completion's starts with the
        steps ``echoed`` (``_echoed``) and its text at ``text_offset``."""
        if self.is_chat:
            return {"content": [self._chat_logprob(out) for out in outputs]}, text_offset
        steps = [*echoed, *((out.token_id, out.logprob, out.top_logprobs) for out in outputs)]
        offsets, position = [], text_offset
        for token_id, _, _ in steps:
            offsets.append(position)
            position += len(self.token_text(token_id))
        return {
            "tokens": [self.logprob_token(token_id) for token_id, _, _ in steps],
            "token_logprobs": [_shown_logprob(logprob) for _, logprob, _ in steps],
            "top_logprobs": [None if top is None else self._completion_top(token_id, logprob, top)
                             for token_id, logprob, top in steps],
            "text_offset": offsets,
        }, position

    def _completion_top(self, token_id: int, logprob: float | None,
                        top: Sequence[tuple[int, float]]) -> dict[str, float | None]:
        """The token itself, then the top ones (as vLLM and OpenAI: up to N + 1 entries). Tokens of the same text
        (byte tokens all show as U+FFFD) share a key, which holds the last of them, as vLLM's dict does: a top token
        after the sampled one overrides its value (with logprobs 1, the best token's: lm-eval's is_greedy check is
        then right; with more, a lower-ranked namesake may override it in vLLM too)."""
        shown = {self.logprob_token(token_id): _shown_logprob(logprob)}
        for top_id, top_logprob in top:
            shown[self.logprob_token(top_id)] = _shown_logprob(top_logprob)
        return shown

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
