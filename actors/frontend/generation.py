"""One request in flight, shared by the OpenAI routes and the WebSocket.

``start_generation`` tokenizes, checks the request against the context, submits
it and waits for the first output, so that every refusal (bad prompt, full
queue) is known before a response is started.  Tokenizing runs on a worker
thread (a 16 MiB body takes seconds), and text too long for the context by its
length alone is refused before it is tokenized.  Leaving the ``async with`` block
early (client gone, handler cancelled) closes the stream, which cancels the
request and frees its KV.  Metrics are recorded as outputs pass.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastdecode.actors.api import AsyncLLM, StreamOutput
from fastdecode.actors.executor import QueueFullError, UnavailableError
from fastdecode.actors.frontend.errors import ApiError, bad_request
from fastdecode.actors.frontend.metrics import FrontendMetrics
from fastdecode.actors.frontend.openai_request import GenerateRequest
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.request import RequestError


async def prompt_token_ids(llm: AsyncLLM, request: GenerateRequest) -> list[int]:
    """The request's prompt as token ids (chat messages through the model's chat template), tokenized off
    the event loop, which also runs the Executor, in-process shards and heartbeats."""
    tokenizer = llm.tokenizer
    if request.messages is not None:
        _check_text_fits(llm, sum(len(m["content"]) for m in request.messages), "messages")
        try:
            return await asyncio.to_thread(tokenizer.encode_chat, [dict(m) for m in request.messages])
        except ModelError as exc:
            raise bad_request(str(exc), "messages") from None
    assert request.prompt is not None
    if isinstance(request.prompt, str):
        _check_text_fits(llm, len(request.prompt), "prompt")
        return await asyncio.to_thread(tokenizer.encode, request.prompt)
    return list(request.prompt)


def _check_text_fits(llm: AsyncLLM, num_chars: int, param: str) -> None:
    """Refuse text with more characters than the whole context could hold, before tokenizing it.

    No token stands for more than ``max_chars_per_token`` characters, so such text has more tokens than
    the context: the same refusal the token count would give, without the seconds of tokenizing.  (A
    chat template that drops message text could have made it fit; that is text the model never sees.)"""
    max_chars = llm.max_model_len * llm.tokenizer.max_chars_per_token
    if num_chars > max_chars:
        text = "the prompt" if param == "prompt" else "the text of the messages"
        raise ApiError(400, f"{text} is too long for this model's context: {num_chars} characters, more than "
                            f"its {llm.max_model_len} tokens can hold (at most {max_chars})",
                       param=param, code="context_length_exceeded")


def generation_error(out: StreamOutput) -> ApiError:
    """What a request that failed mid-generation answers: 503 when the server's state failed it (shutting
    down, no KV node left: a retry may succeed), else 500."""
    message = out.error or "generation failed"
    return ApiError(503, message, code="unavailable") if out.is_retryable else ApiError(500, message)


class Generation:
    """The outputs of one admitted request, and its usage figures."""

    def __init__(self, prompt_ids: list[int], stream: AsyncIterator[StreamOutput], first: StreamOutput,
                 metrics: FrontendMetrics, arrived_at: float) -> None:
        self.prompt_ids = prompt_ids
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self._stream = stream
        self._first: StreamOutput | None = first
        self._metrics = metrics
        self._arrived_at = arrived_at
        self._last_token_at = arrived_at

    async def outputs(self) -> AsyncIterator[StreamOutput]:
        """Every output, the first one included; the last has ``finish_reason`` set."""
        if self._first is not None:
            first, self._first = self._first, None
            self._record(first)
            yield first
            if first.finish_reason is not None:
                return
        async for out in self._stream:
            self._record(out)
            yield out
            if out.finish_reason is not None:
                return

    def _record(self, out: StreamOutput) -> None:
        now = time.monotonic()
        if out.token_id >= 0:
            self._metrics.on_token(now - self._last_token_at, is_first=self.num_output_tokens == 0)
            self.num_output_tokens += 1
            self._last_token_at = now
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason

    def usage(self) -> dict[str, Any]:
        num_prompt = len(self.prompt_ids)
        return {"prompt_tokens": num_prompt, "completion_tokens": self.num_output_tokens,
                "total_tokens": num_prompt + self.num_output_tokens}

    def end(self) -> None:
        self._metrics.on_finished(self.finish_reason or "abort", time.monotonic() - self._arrived_at)


@asynccontextmanager
async def start_generation(llm: AsyncLLM, metrics: FrontendMetrics,
                           request: GenerateRequest) -> AsyncIterator[Generation]:
    """Submit ``request`` and hold it open; refusals raise ``ApiError`` (400 or 429)."""
    arrived_at = time.monotonic()
    prompt_ids = await prompt_token_ids(llm, request)
    params = request.sampling_params(len(prompt_ids), llm.max_model_len)
    stream = llm.stream(prompt_ids, params)
    try:
        try:
            first = await anext(stream)
        except QueueFullError as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", code="queue_full") from None
        except UnavailableError as exc:
            raise ApiError(503, f"{exc}", code="unavailable") from None
        except RequestError as exc:
            raise bad_request(str(exc), "prompt") from None
        metrics.on_admitted(len(prompt_ids))
        generation = Generation(prompt_ids, stream, first, metrics, arrived_at)
        try:
            yield generation
        finally:
            generation.end()
    finally:
        await stream.aclose()
