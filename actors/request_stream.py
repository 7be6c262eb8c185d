"""A request's token stream out of the Executor; closing it early cancels the request."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastdecode.actors.request import TokenEvent
from fastdecode.actors.sequence import Sequence

if TYPE_CHECKING:
    from fastdecode.actors.executor import Executor


class RequestStream:
    """The token events of one request; closing it early cancels the request."""

    def __init__(self, executor: "Executor", seq: Sequence) -> None:
        self._executor = executor
        self._seq = seq
        self._is_done = False

    @property
    def request_id(self) -> int:
        return self._seq.seq_id

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._is_done:
            raise StopAsyncIteration
        try:
            event = await self._seq.events.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if event.finish_reason is not None:
            self._is_done = True
        return event

    def cancel(self, *, is_stop: bool = False) -> None:
        """Stop the request; its KV is freed before the next step. ``is_stop``: its text reached a stop
        string, so it ended as a finished request (its length counts in the scheduler's estimates)."""
        if not self._is_done:
            self._is_done = True
            self._executor.abort(self._seq.seq_id, is_stop=is_stop)

    async def aclose(self) -> None:
        self.cancel()
