"""A request's outputs as the embedding API streams them: ``StreamOutput``, one per step of the request, and
``SubmittedStream``, the outputs of a request already submitted (``AsyncLLM.submit``), cancelled when closed or
dropped."""
from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastdecode.actors.request import PromptLogprob
from fastdecode.actors.unclosed import cancel_dropped


@dataclass(frozen=True)
class StreamOutput:
    """One step of a request's stream: a token and the text it completed; the first one also carries the prompt's
    logprobs where the request asked for them (``SamplingParams.prompt_logprobs``: see ``TokenEvent``)."""

    request_id: int | str  # the caller's id where it named the request (a str), else the engine's
    token_id: int  # -1 on a final event that carries no token (abort, error, stop string)
    text: str  # new text since the previous output (may be empty mid-character)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the last output
    error: str | None = None
    is_retryable: bool = False  # an error of the server's state (shutting down, no KV node left): try again
    # vLLM's stop_reason, on a "stop" output: the stop string or stop token id that ended the request; None for
    # the tokenizer's EOS (a generation_config EOS id other than that one counts as a stop token id, as in vLLM)
    stop_reason: int | str | None = None
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    made_at: float | None = None  # the engine's time of its event (TokenEvent.made_at); None: not known
    rank: int | None = None  # the token's rank in the raw distribution (1: the likeliest), with ``logprob``


class SubmittedStream:
    """The outputs of a request already submitted (AsyncLLM.submit). Unlike an async generator never started,
    ``aclose()`` cancels the request even if nothing was read; so does dropping it unclosed (when it is collected),
    which used to leave the request running to its max_tokens."""

    def __init__(self, request, outputs: AsyncGenerator[StreamOutput, None]) -> None:
        self._request = request
        self._outputs = outputs
        self._finalizer = weakref.finalize(self, cancel_dropped, asyncio.get_running_loop(), request)

    def __aiter__(self) -> "SubmittedStream":
        return self

    async def __anext__(self) -> StreamOutput:
        return await self._outputs.__anext__()

    async def aclose(self) -> None:
        self._finalizer.detach()  # closed: nothing left for the collector to cancel
        self._request.cancel()
        await self._outputs.aclose()
