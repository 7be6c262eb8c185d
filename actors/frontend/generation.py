"""Requests in flight, shared by the OpenAI routes and the WebSocket.

``start_generations`` tokenizes, checks the request against the context, submits
every choice (n samples of each prompt, one engine request each) and waits for
their first outputs, so that every refusal (bad prompt, full queue) is known
before a response is started; ``start_generation`` is its one-choice form.
Tokenizing runs on a worker thread (a 16 MiB body takes seconds), and text too
long for the context by its length alone is refused before it is tokenized.
Leaving the ``async with`` block early (client gone, handler cancelled, one choice
failed) closes the streams, which cancels the requests and frees their KV.
``interleaved`` reads several choices' outputs as they come.  Metrics are recorded
as outputs pass, and so is the ``stop_reason`` the last output carries (vLLM's:
the stop string or stop token id that ended the request; None for EOS and length).
``json_response`` builds and serializes a response over many tokens off the loop too.
A request cancelled before its first token (the client left while its prompt
was tokenized or while it was queued) ends as vLLM's ``abort``, as one cancelled later does; each
ended request leaves one INFO line on the "fastdecode.frontend.requests" logger (ids,
reason, token counts and times, never the prompt; ``--disable-log-requests`` silences it).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

from aiohttp import web
from jinja2 import TemplateError

from fastdecode.actors.api import AsyncLLM, StreamOutput, SubmittedStream
from fastdecode.actors.async_llm import check_text_fits
from fastdecode.actors.executor import QueueFullError, UnavailableError
from fastdecode.actors.executor_config import check_logprobs, check_prompt
from fastdecode.actors.frontend.errors import ApiError, bad_request
from fastdecode.actors.frontend.metrics import FrontendMetrics
from fastdecode.actors.frontend.openai_request import GenerateRequest
from fastdecode.actors.generation_results import merged_outputs
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.tokenizer import Tokenizer
from fastdecode.actors.reasoning_parsers import grammar_start_token
from fastdecode.actors.request import RequestError, SamplingParams

log = logging.getLogger("fastdecode.frontend")
REQUEST_LOGGER = "fastdecode.frontend.requests"  # one INFO line per ended request
request_log = logging.getLogger(REQUEST_LOGGER)

QUEUE_FULL_RETRY_AFTER_S = 1  # a 429's Retry-After: the queue moves by whole requests finishing
# a response over more tokens than this is built and serialized on a worker thread (json_response)
LARGE_RESPONSE_TOKENS = 4096


async def prompt_token_ids(llm: AsyncLLM, request: GenerateRequest) -> list[int]:
    """The request's prompt as token ids (chat messages through the model's chat template), tokenized off
    the event loop, which also runs the Executor, in-process shards and heartbeats, then cut to its
    ``truncate_prompt_tokens`` (vLLM's: text too long for the context is then tokenized, not refused)."""
    tokenizer = llm.tokenizer
    is_truncated = request.truncate_prompt_tokens is not None
    if request.messages is not None:
        if not is_truncated:
            _check_text_fits(llm, sum(len(m["content"]) for m in request.messages), "messages")
        # special tokens only when add_special_tokens asks (vLLM's chat default: the template writes them)
        ids = await chat_token_ids(tokenizer, request.messages, add_special_tokens=bool(request.add_special_tokens),
                                   template_kwargs=request.chat_template_kwargs)
    elif isinstance(request.prompt, str):
        if not is_truncated:
            _check_text_fits(llm, len(request.prompt), "prompt")
        is_special = request.add_special_tokens is not False  # vLLM's completions default: true
        ids = await asyncio.to_thread(tokenizer.encode, request.prompt, add_special_tokens=is_special)
    else:
        assert request.prompt is not None
        ids = list(request.prompt)
    return request.truncated(ids, llm.max_model_len)


async def chat_token_ids(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], *,
                         add_generation_prompt: bool = True, add_special_tokens: bool = False,
                         template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """A chat's token ids (``Tokenizer.encode_chat``, on a worker thread): its template rendered with the extra
    variables ``template_kwargs``; a template that fails is a 400."""
    try:
        return await asyncio.to_thread(tokenizer.encode_chat, [dict(m) for m in messages],
                                       add_generation_prompt=add_generation_prompt,
                                       add_special_tokens=add_special_tokens, **(template_kwargs or {}))
    except ModelError as exc:
        raise bad_request(str(exc), "messages") from None
    except (TemplateError, TypeError) as exc:  # the template's own refusal of these messages, or of the kwargs
        if template_kwargs:
            raise bad_request(f"the chat template failed with these chat_template_kwargs: {exc}",
                              "chat_template_kwargs") from None
        raise bad_request(f"the chat template failed on these messages: {exc}", "messages") from None


def _check_text_fits(llm: AsyncLLM, num_chars: int, param: str) -> None:
    """Refuse text with more characters than the whole context could hold, before tokenizing it
    (``async_llm.check_text_fits``), as a 400 ``context_length_exceeded``."""
    try:
        check_text_fits(num_chars, llm.max_model_len, llm.tokenizer.max_chars_per_token, param)
    except RequestError as exc:
        raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from None


def generation_error(out: StreamOutput) -> ApiError:
    """What a request that failed mid-generation answers: 503 when the server's state failed it (shutting
    down, no KV node left: a retry may succeed), else 500."""
    message = out.error or "generation failed"
    if out.is_retryable:
        return ApiError(503, message, code="unavailable", is_admitted=True)
    return ApiError(500, message, is_admitted=True)


class Generation:
    """The outputs of one admitted engine request (one choice of a response), and its usage figures.

    ``echo_text``: the prompt's text, which the choice's text starts with (completions' echo), else None.
    ``is_output_dropped``: an echo without generation (max_tokens 0): the one token generated is not shown, the
    request ends as ``length`` with no output token."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stream: AsyncIterator[StreamOutput],
                 metrics: FrontendMetrics, arrived_at: float, *, index: int = 0, prompt_index: int = 0,
                 echo_text: str | None = None, is_output_dropped: bool = False) -> None:
        self.prompt_ids = prompt_ids
        self.index = index  # the choice's index in the response
        self.prompt_index = prompt_index
        self.echo_text = echo_text
        self.is_output_dropped = is_output_dropped
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the last output's (set with finish_reason)
        self.request_id: int | None = None  # the engine's, once an output came
        self._params = params
        self._stream = stream
        self._first: StreamOutput | None = None
        self._metrics = metrics
        self._arrived_at = arrived_at
        self._last_token_at = arrived_at
        self._first_token_s: float | None = None  # time to first token
        self._finished_at: float | None = None  # when its last output came (e2e ends there, as vLLM's per request)
        self._is_prefilled = False  # its first output came: its prompt counts in prompt_tokens_total

    async def read_first(self) -> None:
        """Wait for the first output (it is handed out first by ``outputs``); a refusal raises ``ApiError``."""
        self._first = await _first_output(self._stream)

    async def outputs(self) -> AsyncIterator[StreamOutput]:
        """Every output, the first one included; the last has ``finish_reason`` set."""
        if self._first is not None:
            first, self._first = self._first, None
            first = self._shown(first)
            self._record(first)
            yield first
            if first.finish_reason is not None:
                return
        async for out in self._stream:
            out = self._shown(out)
            self._record(out)
            yield out
            if out.finish_reason is not None:
                return

    def _shown(self, out: StreamOutput) -> StreamOutput:
        """``out`` as the response shows it: an echo without generation ends with no token (its one token, which
        ended the request, is dropped)."""
        if not self.is_output_dropped or out.token_id < 0:
            return out
        return dataclasses.replace(out, token_id=-1, text="", logprob=None, top_logprobs=(), finish_reason="length",
                                   stop_reason=None)

    def _record(self, out: StreamOutput) -> None:
        now = out.made_at if out.made_at is not None else time.monotonic()  # the engine's time, not the reader's
        self.request_id = out.request_id
        if not self._is_prefilled and out.finish_reason not in ("abort", "error"):
            self._is_prefilled = True  # as vLLM, a prompt counts once its prefill gave an output
            self._metrics.on_prefilled(len(self.prompt_ids))
        if out.token_id >= 0:
            is_first = self.num_output_tokens == 0
            self._metrics.on_token(now - self._last_token_at, is_first=is_first)
            if is_first:
                self._first_token_s = now - self._arrived_at
            self.num_output_tokens += 1
            self._last_token_at = now
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
            self._finished_at = now

    def usage(self) -> dict[str, Any]:
        num_prompt = len(self.prompt_ids)
        return {"prompt_tokens": num_prompt, "completion_tokens": self.num_output_tokens,
                "total_tokens": num_prompt + self.num_output_tokens}

    def end(self) -> None:
        """Count the request as ended (``abort`` if it had not finished: cancelled) and log it."""
        e2e_s = (self._finished_at or time.monotonic()) - self._arrived_at  # not the response's writing after it
        _end_choice(self._metrics, self.finish_reason or "abort", e2e_s, index=self.index,
                    num_prompt_tokens=len(self.prompt_ids), max_tokens=self._params.max_tokens,
                    num_output_tokens=self.num_output_tokens, request_id=self.request_id,
                    first_token_s=self._first_token_s)


def _end_choice(metrics: FrontendMetrics, finish_reason: str, e2e_s: float, *, index: int,
                num_prompt_tokens: int | None, max_tokens: int | None, num_output_tokens: int = 0,
                request_id: int | None = None, first_token_s: float | None = None) -> None:
    """Count one choice as ended and log its line; a count of None is not known (its prompt was not tokenized)."""
    metrics.on_finished(finish_reason, e2e_s, num_prompt_tokens=num_prompt_tokens,
                        num_generation_tokens=num_output_tokens, max_tokens=max_tokens)
    ttft = "-" if first_token_s is None else f"{first_token_s:.3f}s"
    request_log.info("request %s (choice %d) finished: %s, %s prompt tokens, %d completion tokens, TTFT %s, e2e %.3fs",
                     "-" if request_id is None else request_id, index, finish_reason,
                     "-" if num_prompt_tokens is None else num_prompt_tokens, num_output_tokens, ttft, e2e_s)


def admission_error(exc: BaseException) -> ApiError | None:
    """The answer to a request the engine refused at submission (None: not a refusal)."""
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"the server is busy: {exc}; retry later", code="queue_full",
                        retry_after_s=QUEUE_FULL_RETRY_AFTER_S)
    if isinstance(exc, UnavailableError):
        return ApiError(503, f"{exc}", code=exc.code)
    if isinstance(exc, RequestError):
        return bad_request(str(exc), exc.param or "prompt")
    return None


@asynccontextmanager
async def start_generations(llm: AsyncLLM, metrics: FrontendMetrics, request: GenerateRequest, *,
                            max_num_choices: int | None = None) -> AsyncIterator[list[Generation]]:
    """Submit every choice of ``request`` and hold them open: n samples of each prompt, each its own engine
    request, choice ``prompt_index * n + sample_index`` (vLLM's numbering).  Every prompt is tokenized and
    checked before any choice is submitted, and a refusal of any (``ApiError``: 400, 429 or 503) cancels them
    all before a response starts.  A single choice of a whole (not streamed) response has its first output
    awaited too (a request the server fails at once gets its status); otherwise the choices are only submitted, so
    a stream's headers go out at once, as vLLM's, while its choices wait for room and prefill (before, a streamed
    single choice sent nothing until its first token: a client with a time limit on headers gave up on a request
    that was only queued).  Leaving the block cancels every unfinished choice and frees its KV."""
    arrived_at = time.monotonic()
    num_samples = request.num_samples
    num_choices = request.num_prompts * num_samples
    if max_num_choices is not None and num_choices > max_num_choices:
        raise bad_request(f"the request asks for {num_choices} choices ({request.num_prompts} prompt(s) x n="
                          f"{num_samples}); this server queues at most {max_num_choices} (--max-queue)",
                          "n" if num_samples > 1 else "prompt")
    _check_token_id_sizes(llm, request)
    defaults = llm.model_config.sampling_defaults
    submissions = []  # (prompt index, prompt ids, params, echoed text) per choice, in choice order
    try:
        for prompt_index, one in enumerate(request.per_prompt()):
            prompt_ids = await prompt_token_ids(llm, one)
            samples_params = one.samples_params(len(prompt_ids), llm.max_model_len, defaults, llm.tokenizer)
            _check_logprobs(llm, one, samples_params[0])
            if one.reasoning_parser is not None and samples_params[0].structured_outputs is not None:
                # a reasoning model's structured output holds its answer, after the thinking (vLLM's)
                end_id = grammar_start_token(llm.tokenizer, prompt_ids)
                if end_id is not None:
                    samples_params = [params.with_reasoning_end(end_id) for params in samples_params]
            if samples_params[0].structured_outputs is not None:  # compiled off the loop, once (cached)
                try:
                    await llm.compile_structured_outputs(samples_params[0])
                except RequestError as exc:
                    raise bad_request(str(exc), exc.param) from None
            echo_text = await _echo_text(llm, one, prompt_ids, samples_params[0]) if request.is_echo else None
            submissions += [(prompt_index, prompt_ids, params, echo_text) for params in samples_params]
    except asyncio.CancelledError:  # the client left while its prompts were tokenized: an abort, as once queued
        _end_unsubmitted(metrics, submissions, num_choices, time.monotonic() - arrived_at)
        raise
    streams: list[AsyncIterator[StreamOutput]] = []
    try:
        generations = []
        is_first_awaited = len(submissions) == 1 and not request.is_stream
        for index, (prompt_index, prompt_ids, params, echo_text) in enumerate(submissions):
            # an awaited choice is submitted as its first output is awaited, others at once
            streams.append(llm.stream(prompt_ids, params) if is_first_awaited
                           else _submitted(llm, prompt_ids, params))
            generations.append(Generation(prompt_ids, params, streams[-1], metrics, arrived_at, index=index,
                                          prompt_index=prompt_index, echo_text=echo_text,
                                          is_output_dropped=request.is_echo and request.max_tokens == 0))
        try:
            if is_first_awaited:
                await generations[0].read_first()
        except asyncio.CancelledError:  # the client left while its request waited: vLLM counts an abort
            _admit(metrics, generations, num_samples)
            generations[0].end()
            raise
        _admit(metrics, generations, num_samples)
        try:
            yield generations
        finally:
            for generation in generations:
                generation.end()
    finally:
        for stream in streams:
            await stream.aclose()


async def json_response(build: Callable[[], dict[str, Any]], *, num_tokens: int) -> web.Response:
    """``build()`` as a JSON response. One over more than LARGE_RESPONSE_TOKENS tokens (a long prompt's logprobs or
    echo, a long text's tokens and their strings) is built and serialized on a worker thread: on the loop it took
    seconds, stalling every step's attends (in-process shards share the loop), the heartbeats and the other streams."""
    if num_tokens <= LARGE_RESPONSE_TOKENS:
        return web.json_response(build())
    return web.json_response(text=await asyncio.to_thread(lambda: json.dumps(build())))


def _check_logprobs(llm: AsyncLLM, request: GenerateRequest, params: SamplingParams) -> None:
    """The engine's max_logprobs check (``check_logprobs``) before submission, naming the field the request gave:
    chat asks for top logprobs with ``top_logprobs``."""
    if params.logprobs is None and params.prompt_logprobs is None:
        return
    try:
        vocab_size = llm.model_config.vocab_size
        check_logprobs(params.with_vocab_logprobs(vocab_size), llm.max_logprobs, vocab_size)
    except RequestError as exc:
        is_chat_top = exc.param == "logprobs" and request.messages is not None
        raise bad_request(str(exc), "top_logprobs" if is_chat_top else exc.param) from None


def _check_token_id_sizes(llm: AsyncLLM, request: GenerateRequest) -> None:
    """A logit_bias of more entries than the vocabulary has tokens names one outside it, which submission refuses
    (``check_prompt``): refused before any prompt's parameters are built or submitted. More stop_token_ids than that
    repeat some: each generated token is looked up among them on the event loop."""
    for name, kind in (("logit_bias", "entries"), ("stop_token_ids", "ids")):
        num_ids = len(request.sampling.get(name) or ())
        if num_ids and num_ids > (vocab_size := llm.model_config.vocab_size):
            raise bad_request(f"{name} has {num_ids} {kind}, more than this model's vocabulary of {vocab_size} "
                              "tokens", name)


async def _echo_text(llm: AsyncLLM, request: GenerateRequest, prompt_ids: list[int], params: SamplingParams) -> str:
    """The text an echo repeats: the prompt as given, or its token ids decoded with their special tokens (vLLM's:
    the echoed logprobs name each token, so the text holds every one of them).  The ids are checked first as their
    submission checks them, for the same 400 (the tokenizer fails on one outside 32 bits)."""
    if isinstance(request.prompt, str):
        return request.prompt
    try:
        check_prompt(prompt_ids, llm.model_config.vocab_size, llm.max_model_len, params,
                     max_logprobs=llm.max_logprobs)
    except RequestError as exc:
        raise admission_error(exc) or exc from None
    return await asyncio.to_thread(functools.partial(llm.tokenizer.decode, skip_special_tokens=False),
                                   list(prompt_ids))


def _end_unsubmitted(metrics: FrontendMetrics, submissions: list[tuple[int, list[int], SamplingParams, str | None]],
                     num_choices: int, e2e_s: float) -> None:
    """Count every choice of a request cancelled before it was submitted as an ``abort``: those of the prompts
    tokenized (``submissions``) with their prompt tokens and max_tokens, the others with neither (not known)."""
    for index in range(num_choices):
        num_prompt_tokens = max_tokens = None  # not known: its prompt was not tokenized
        if index < len(submissions):
            _, prompt_ids, params, _ = submissions[index]
            num_prompt_tokens, max_tokens = len(prompt_ids), params.max_tokens
        _end_choice(metrics, "abort", e2e_s, index=index, num_prompt_tokens=num_prompt_tokens, max_tokens=max_tokens)


def _admit(metrics: FrontendMetrics, generations: list[Generation], num_samples: int) -> None:
    for _ in range(len(generations) // num_samples):
        metrics.on_prompt_admitted(num_samples)


async def _first_output(stream: AsyncIterator[StreamOutput]) -> StreamOutput:
    try:
        return await anext(stream)
    except Exception as exc:
        raise admission_error(exc) or exc from None


def _submitted(llm: AsyncLLM, prompt_ids: list[int], params: SamplingParams) -> SubmittedStream:
    try:
        return llm.submit(prompt_ids, params)
    except Exception as exc:
        raise admission_error(exc) or exc from None


@asynccontextmanager
async def start_generation(llm: AsyncLLM, metrics: FrontendMetrics,
                           request: GenerateRequest) -> AsyncIterator[Generation]:
    """Submit a one-choice ``request`` and hold it open; refusals raise ``ApiError`` (400, 429 or 503)."""
    async with start_generations(llm, metrics, request) as generations:
        (generation,) = generations
        yield generation


async def interleaved(generations: list[Generation]) -> AsyncIterator[tuple[Generation, StreamOutput]]:
    """The outputs of every generation as they come, each with its generation, until all have ended.  Use it
    in ``contextlib.aclosing``: leaving early stops the readers (the requests are cancelled when
    ``start_generations`` closes their streams)."""
    async with aclosing(merged_outputs([generation.outputs() for generation in generations])) as outputs:
        async for index, out in outputs:
            yield generations[index], out


def total_usage(generations: list[Generation]) -> dict[str, Any]:
    """The usage of all choices: each prompt's tokens counted once (as vLLM), every choice's output."""
    num_prompt = sum(len(g.prompt_ids) for g in {g.prompt_index: g for g in generations}.values())
    num_output = sum(g.num_output_tokens for g in generations)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output}
