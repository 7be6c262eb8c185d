"""Server-sent events: one ``data: <json>`` event per chunk, ending with ``data: [DONE]`` (the completions routes), or
named events (the Responses API)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web


class EventStream:
    """A ``text/event-stream`` response being written."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request) -> "EventStream":
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not hold events back
        })
        await response.prepare(request)
        return cls(response)

    async def send(self, data: dict[str, Any]) -> None:
        await self.response.write(_event(data))

    async def send_event(self, name: str, data: dict[str, Any]) -> None:
        """A named event (``event: <name>``), as OpenAI's Responses API streams them."""
        await self.response.write(f"event: {name}\n".encode() + _event(data))

    async def send_built(self, build: Callable[[], dict[str, Any]]) -> None:
        """``build()`` as the next event, built and serialized on a worker thread: a chunk over a long prompt (an
        echo's text and logprobs) took as long as a whole response over as many tokens, on the event loop."""
        await self.response.write(await asyncio.to_thread(lambda: _event(build())))

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()


def _event(data: dict[str, Any]) -> bytes:
    line = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {line}\n\n".encode("utf-8")
