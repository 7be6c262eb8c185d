"""One request in flight, shared by the OpenAI routes and the WebSocket.

``start_generation`` tokenizes, checks the request against the context, submits
it and waits for the first output, so that every refusal (bad prompt, full
queue) is known before a response is started.  Tokenizing runs on a worker
thread (a 16 MiB body takes seconds), and text too long for the context by its
length alone is refused before it is tokenized.  Leaving the ``async with`` block
early (client gone, handler cancelled) closes the stream, which cancels the
request and frees its KV.  Metrics are recorded as outputs pass, and so is the
``stop_reason`` of a request that stopped (vLLM's: the stop string or stop token
id that ended it; None for EOS).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from jinja2 import TemplateError

from fastdecode.actors.api import AsyncLLM, StreamOutput
from fastdecode.actors.detokenize import Detokenizer
from fastdecode.actors.executor import QueueFullError, UnavailableError
from fastdecode.actors.frontend.errors import ApiError, bad_request
from fastdecode.actors.frontend.metrics import FrontendMetrics
from fastdecode.actors.frontend.openai_request import GenerateRequest
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.request import RequestError, SamplingParams


async def prompt_token_ids(llm: AsyncLLM, request: GenerateRequest) -> list[int]:
    """The request's prompt as token ids (chat messages through the model's chat template), tokenized off
    the event loop, which also runs the Executor, in-process shards and heartbeats."""
    tokenizer = llm.tokenizer
    if request.messages is not None:
        _check_text_fits(llm, sum(len(m["content"]) for m in request.messages), "messages")
        try:
            return await asyncio.to_thread(_encode_chat, tokenizer, request)
        except ModelError as exc:
            raise bad_request(str(exc), "messages") from None
        except (TemplateError, TypeError) as exc:  # what chat_template_kwargs made of the template
            raise bad_request(f"the chat template failed with these chat_template_kwargs: {exc}",
                              "chat_template_kwargs") from None
    assert request.prompt is not None
    if isinstance(request.prompt, str):
        _check_text_fits(llm, len(request.prompt), "prompt")
        is_special = request.add_special_tokens is not False  # vLLM's completions default: true
        return await asyncio.to_thread(tokenizer.encode, request.prompt, add_special_tokens=is_special)
    return list(request.prompt)


def _encode_chat(tokenizer: Any, request: GenerateRequest) -> list[int]:
    """The chat's token ids: its template rendered with the request's extra variables, then tokenized with
    special tokens only when ``add_special_tokens`` asks (vLLM's chat default: the template writes them)."""
    messages = [dict(m) for m in request.messages or ()]
    if not request.chat_template_kwargs and not request.add_special_tokens:
        return tokenizer.encode_chat(messages)
    text = tokenizer.apply_chat_template(messages, **request.chat_template_kwargs)
    return tokenizer.encode(text, add_special_tokens=bool(request.add_special_tokens))


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


class StopReasons:
    """Which stop ended a request (vLLM's ``stop_reason``): the stop token id, the stop string, or None (EOS).

    The engine stops on stop token ids before EOS, and the embedding API finds stop strings; its outputs say
    only "stop", so a string is told apart from a token here, and among several stop strings the one that
    matched is found by replaying the same ``Detokenizer`` over the request's tokens."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._eos_token_ids = eos_token_ids
        self._params = params

    def of(self, prompt_ids: list[int], output_ids: list[int]) -> int | str | None:
        """The stop reason of a request that ended with ``finish_reason == "stop"`` after ``output_ids``."""
        params = self._params
        last = output_ids[-1] if output_ids else -1
        if last in params.stop_token_ids:
            return last
        if (last in self._eos_token_ids and not params.ignore_eos) or not params.stop:
            return None
        if len(params.stop) == 1:
            return params.stop[0]
        detokenizer = Detokenizer(self._tokenizer, prompt_ids, stop=params.stop, min_tokens=params.min_tokens)
        for token_id in output_ids:
            if detokenizer.add(token_id)[1]:
                break
        return detokenizer.stop_string


class Generation:
    """The outputs of one admitted request, and its usage figures."""

    def __init__(self, prompt_ids: list[int], stream: AsyncIterator[StreamOutput], first: StreamOutput,
                 metrics: FrontendMetrics, arrived_at: float, stop_reasons: StopReasons | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # set when finish_reason becomes "stop"
        self.output_ids: list[int] = []
        self._stop_reasons = stop_reasons
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
            self.output_ids.append(out.token_id)
            self._last_token_at = now
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            if out.finish_reason == "stop" and self._stop_reasons is not None:
                self.stop_reason = self._stop_reasons.of(self.prompt_ids, self.output_ids)

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
    params = request.sampling_params(len(prompt_ids), llm.max_model_len, llm.model_config.sampling_defaults)
    stream = llm.stream(prompt_ids, params)
    try:
        try:
            first = await anext(stream)
        except QueueFullError as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", code="queue_full") from None
        except UnavailableError as exc:
            raise ApiError(503, f"{exc}", code="unavailable") from None
        except RequestError as exc:
            raise bad_request(str(exc), exc.param or "prompt") from None
        metrics.on_admitted(len(prompt_ids))
        stop_reasons = StopReasons(llm.tokenizer, llm.cluster.executor.eos_token_ids, params)
        generation = Generation(prompt_ids, stream, first, metrics, arrived_at, stop_reasons)
        try:
            yield generation
        finally:
            generation.end()
    finally:
        await stream.aclose()
