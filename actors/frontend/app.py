"""The Frontend's aiohttp application: routes, guards, health, version and metrics."""
from __future__ import annotations

import importlib.metadata
import time

from aiohttp import web

from fastdecode.actors.frontend.metrics import CONTENT_TYPE
from fastdecode.actors.frontend.middleware import (
    WEBSOCKET_PATH,
    add_cors_headers,
    api_key_middleware,
    cors_middleware,
    errors_middleware,
)
from fastdecode.actors.frontend.openai_request import MAX_BODY_BYTES
from fastdecode.actors.frontend.openai_routes import CREATED_AT, chat_completions, completions, model, models
from fastdecode.actors.frontend.responses_api import responses
from fastdecode.actors.frontend.state import STATE, FrontendState
from fastdecode.actors.frontend.tokenize_routes import detokenize, tokenize
from fastdecode.actors.frontend.websocket import stream_socket

VERSION = web.AppKey("fastdecode_version", str)


async def health(request: web.Request) -> web.Response:
    """200 once the engine can serve, 503 before (starting), while draining or stopping, and while no KV
    node is reachable; no key needed.  Also vLLM's (SageMaker's) ``GET``/``POST /ping``."""
    state = request.app[STATE]
    if state.is_ready:
        if not state.llm.cluster.executor.has_live_node:
            return web.json_response({"status": "no_kv_node"}, status=503)
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "draining" if state.is_draining else "starting"}, status=503)


async def version(request: web.Request) -> web.Response:
    """vLLM's ``GET /version``: this server's package version; no key needed."""
    return web.json_response({"version": request.app[VERSION]})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cluster = state.llm.cluster if state.llm is not None else None
    body = await state.metrics.render(cluster)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def _package_version() -> str:
    try:
        return importlib.metadata.version("fastdecode")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_app(state: FrontendState) -> web.Application:
    """The HTTP and WebSocket app around ``state`` (attach the engine to ``state.llm`` when it is up)."""
    app = web.Application(middlewares=[errors_middleware, cors_middleware, api_key_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app[VERSION] = _package_version()
    app[CREATED_AT] = int(time.time())  # the model cards' ``created``: when this server started
    app.on_response_prepare.append(add_cors_headers)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_post("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # an id may hold a slash (org/name)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get(WEBSOCKET_PATH, stream_socket)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app
