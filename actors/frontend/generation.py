"""One request in flight, shared by the OpenAI routes and the WebSocket.

``start_generation`` tokenizes, checks the request against the context, submits
it and waits for the first output, so that every refusal (bad prompt, full
queue) is known before a response is started.  Leaving the ``async with`` block
early (client gone, handler cancelled) closes the stream, which cancels the
request and frees its KV.  Metrics are recorded as outputs pass.
"""
from __future__ import annotations

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


def prompt_token_ids(llm: AsyncLLM, request: GenerateRequest) -> list[int]:
    """The request's prompt as token ids (chat messages through the model's chat template)."""
    if request.messages is not None:
        try:
            return llm.tokenizer.encode_chat([dict(m) for m in request.messages])
        except ModelError as exc:
            raise bad_request(str(exc), "messages") from None
    assert request.prompt is not None
    return llm.encode(request.prompt)


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
    prompt_ids = prompt_token_ids(llm, request)
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
