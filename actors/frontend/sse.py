"""Server-sent events: one ``data: <json>`` event per chunk, ending with ``data: [DONE]``."""
from __future__ import annotations

import json
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
        line = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        await self.response.write(f"data: {line}\n\n".encode("utf-8"))

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
