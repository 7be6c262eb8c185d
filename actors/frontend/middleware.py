"""The two guards in front of every route: the API key, and errors as OpenAI JSON.

A request that fails in any way gets a JSON error with its status; an
unexpected failure is logged and answered with 500; the server goes on.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.state import STATE

log = logging.getLogger("fastdecode.frontend")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROTECTED_PREFIX = "/v1/"
WEBSOCKET_PATH = "/v1/stream"  # the one route that also takes the key as ?token=
# vLLM's tokenizer routes, outside /v1 (vLLM leaves them open; here they cost CPU time on up to 16 MiB bodies)
PROTECTED_PATHS = frozenset({"/tokenize", "/detokenize"})


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if request.path == WEBSOCKET_PATH and not header:  # browsers cannot set headers on a WebSocket
        return request.query.get("token")
    return None  # elsewhere only the header, as vLLM: a key in a URL ends up in proxies' logs


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[STATE].metrics
    try:
        return await handler(request)
    except ApiError as exc:
        metrics.on_rejected(exc.status)
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        metrics.on_rejected(exc.status)
        return ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}").response()
    except Exception as exc:  # a bug must cost one request, never the server
        log.exception("unexpected error in %s %s", request.method, request.path)
        metrics.on_rejected(500)
        return ApiError(500, f"internal error: {exc}").response()


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    api_key = request.app[STATE].config.api_key
    if api_key is not None and (request.path.startswith(PROTECTED_PREFIX) or request.path in PROTECTED_PATHS):
        presented = _presented_key(request)
        # a header may carry any byte (aiohttp hands non-UTF-8 ones over as surrogates): compare as bytes
        if presented is None or not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                                                        api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")
    return await handler(request)
