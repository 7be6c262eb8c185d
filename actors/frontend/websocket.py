"""``GET /v1/stream``: token streaming over a WebSocket.

The client sends one JSON request (``prompt`` or ``messages`` plus sampling
fields).  The server answers ``{"type": "token", "text", "token_id"}`` per token
(with ``logprob`` when asked), then ``{"type": "done", "finish_reason", "stop_reason", "usage"}``
(``stop_reason``: the stop string or stop token id that ended it, else null, as in the OpenAI routes),
or ``{"type": "error", "message", "status"}``, and closes.  A client that
closes early cancels its request.  One request per socket: a further message while it runs gets an error event
(400) and the request runs on.  A browser's ``Origin`` outside ``--allowed-origins`` gets 403 before the
upgrade (cross-site WebSocket hijacking: browsers apply no CORS to WebSockets).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import WSMsgType, web

from fastdecode.actors.frontend.errors import ApiError, bad_request
from fastdecode.actors.frontend.generation import Generation, generation_error, start_generation
from fastdecode.actors.frontend.middleware import is_origin_allowed
from fastdecode.actors.frontend.openai_request import (
    MAX_BODY_BYTES,
    GenerateRequest,
    parse_body,
    parse_stream_request,
)
from fastdecode.actors.frontend.state import STATE, FrontendState

log = logging.getLogger("fastdecode.frontend")

REQUEST_TIMEOUT_S = 60.0  # how long a connected client may take to send its request
HEARTBEAT_S = 30.0


async def stream_socket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    origin = request.headers.get("Origin")  # a browser's page; other clients send none
    if origin is not None and not is_origin_allowed(state.config, origin):
        raise ApiError(403, f"the origin {origin} may not open this WebSocket (see --allowed-origins)",
                       code="origin_not_allowed")
    state.require_llm()  # refuse before the upgrade while not ready (auth is checked by the middleware)
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_BODY_BYTES)  # the HTTP routes' body limit
    await ws.prepare(request)
    try:
        await _serve_one(ws, state)
    except ApiError as exc:
        await _refuse(ws, state, exc)
    finally:
        await ws.close()
    return ws


async def _serve_one(ws: web.WebSocketResponse, state: FrontendState) -> None:
    try:
        message = await ws.receive(timeout=REQUEST_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise bad_request(f"no request within {REQUEST_TIMEOUT_S:.0f} s") from None
    if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        return
    if message.type is not WSMsgType.TEXT:
        raise bad_request("send the request as one JSON text message")
    body = await parse_body(message.data, parse_stream_request)
    state.check_model(body.model)
    # the client may close while its request waits in the queue, before any output: watched from the start
    serving = asyncio.create_task(_generate(ws, state, body))
    closed = asyncio.create_task(_wait_for_close(ws, state))
    try:
        await asyncio.wait({serving, closed}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # a refusal (ApiError) goes back to the client
    finally:
        for task in (serving, closed):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
                await task


async def _generate(ws: web.WebSocketResponse, state: FrontendState, body: GenerateRequest) -> None:
    async with start_generation(state.require_llm(), state.metrics, body) as generation:
        await _send_outputs(ws, generation, wants_logprobs=body.num_logprobs is not None)
    # leaving the block (cancelled included) closes the stream: an unfinished request is cancelled, its KV freed


async def _send_outputs(ws: web.WebSocketResponse, generation: Generation, *, wants_logprobs: bool) -> None:
    async for out in generation.outputs():
        if out.finish_reason == "error":
            error = generation_error(out)
            await ws.send_json({"type": "error", "message": error.message, "status": error.status})
            return
        if out.token_id >= 0:
            message: dict[str, Any] = {"type": "token", "text": out.text, "token_id": out.token_id}
            if wants_logprobs:
                message["logprob"] = out.logprob
                message["top_logprobs"] = [[t, lp] for t, lp in out.top_logprobs]
            await ws.send_json(message)
    await ws.send_json({"type": "done", "finish_reason": generation.finish_reason,
                        "stop_reason": generation.stop_reason, "usage": generation.usage()})


async def _wait_for_close(ws: web.WebSocketResponse, state: FrontendState) -> None:
    """Returns when the client closes or the connection drops.  A further request meanwhile is refused with an
    error event (a 400, counted as such); the running request goes on."""
    while True:
        message = await ws.receive()
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            await _refuse(ws, state, bad_request("this socket is running a request and takes one request per "
                                                 "socket; open a new socket for the next one"))


async def _refuse(ws: web.WebSocketResponse, state: FrontendState, exc: ApiError) -> None:
    """A refused request's error event, counted as rejected with its status."""
    state.metrics.on_rejected(exc.status)
    await _send(ws, {"type": "error", "message": exc.message, "status": exc.status})


async def _send(ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
    if not ws.closed:
        with contextlib.suppress(ConnectionResetError):
            await ws.send_json(message)
