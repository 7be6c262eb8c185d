"""A fake OpenAI-style server for fdctl bench serve's tests, run in a thread of its own (``serving``): ``/v1/models``
naming one model, and the ``/v1/completions`` (plus any ``extra_routes``) a subclass defines."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web


class FakeOpenAI:
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self.extra_routes(app)
        return app

    def extra_routes(self, app: web.Application) -> None:
        """Routes beyond the two every fake has."""

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    @staticmethod
    async def stream_tokens(request: web.Request, body: dict, *, gap_s: float = 0.0) -> web.StreamResponse:
        """A completion streamed as vLLM streams it: ``max_tokens`` chunks of "a" (``gap_s`` apart), then the usage
        chunk and ``[DONE]``."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(body["max_tokens"]):
            if i and gap_s:
                await asyncio.sleep(gap_s)
            await response.write(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}}
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return response


@contextmanager
def serving(fake: FakeOpenAI) -> Iterator[str]:
    """Runs ``fake`` on a free loopback port in a thread of its own; yields its URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
