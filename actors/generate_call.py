"""What ``AsyncLLM.generate`` returns: awaited, the request's final GenerationResult; iterated with ``async for``,
vLLM's ``AsyncLLM.generate`` generator of results as the tokens come (``SamplingParams.output_kind``)."""
from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any

from fastdecode.actors.request import GenerationResult


class GenerateCall(Coroutine):
    """One ``generate`` call, awaited or iterated, once. Awaited it is a coroutine (``asyncio.create_task`` and
    ``run_coroutine_threadsafe`` take it) of the final result. Iterated (``async for``, ``anext``) it runs the request
    anew, as vLLM's generator: leaving the loop early cancels the request and frees its KV once the iteration is
    closed, at once for an inline ``async for``, else with ``aclose()`` or ``contextlib.aclosing``. A call neither
    awaited nor iterated warns as a coroutine never awaited does."""

    def __init__(self, result: Coroutine[Any, Any, GenerationResult],
                 results: Callable[[], AsyncGenerator[GenerationResult, None]]) -> None:
        self._result = result  # made now: what warns if the call is dropped unused
        self._make_results = results
        self._results: AsyncGenerator[GenerationResult, None] | None = None

    # ---- awaited ------------------------------------------------------------------------------
    def __await__(self):
        if self._results is not None:
            raise RuntimeError("this generate call was iterated: await a new call to generate for the final result")
        return self._result.__await__()

    def send(self, value):
        return self._result.send(value)

    def throw(self, *args):
        return self._result.throw(*args)

    def close(self) -> None:
        self._result.close()

    # ---- iterated -----------------------------------------------------------------------------
    def __aiter__(self) -> "GenerateCall":
        if self._results is None:
            if inspect.getcoroutinestate(self._result) != inspect.CORO_CREATED:
                raise RuntimeError("this generate call was awaited: iterate a new call to generate for its outputs")
            self._result.close()  # never started: no warning
            self._results = self._make_results()
        return self

    def __anext__(self) -> Awaitable[GenerationResult]:
        return self.__aiter__()._results.__anext__()

    async def aclose(self) -> None:
        """Close the iteration (a request running is cancelled, its KV freed); a call never iterated is let go
        unused (awaiting it then raises)."""
        if self._results is None:
            self._result.close()
        else:
            await self._results.aclose()
