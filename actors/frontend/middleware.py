"""The guards in front of every route: errors as OpenAI JSON, CORS for browsers, and the API key.

A request that fails in any way gets a JSON error with its status; an
unexpected failure is logged and answered with 500; the server goes on.
CORS follows vLLM's (Starlette's) middleware: a browser's preflight is answered
before the key is checked, and every response to an allowed Origin carries the
``Access-Control-Allow-*`` headers (added as it is prepared, so errors and SSE
streams carry them too); a disallowed Origin gets none.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.state import STATE, FrontendConfig

log = logging.getLogger("fastdecode.frontend")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROTECTED_PREFIX = "/v1/"
WEBSOCKET_PATH = "/v1/stream"  # the one route that also takes the key as ?token=
# vLLM's tokenizer routes, outside /v1 (vLLM leaves them open; here they cost CPU time on up to 16 MiB bodies)
PROTECTED_PATHS = frozenset({"/tokenize", "/detokenize"})
ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")  # what an allowed "*" method lists
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
PREFLIGHT_MAX_AGE_S = 600  # how long a browser may cache a preflight's answer


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if request.path == WEBSOCKET_PATH and not header:  # browsers cannot set headers on a WebSocket
        return request.query.get("token")
    return None  # elsewhere only the header, as vLLM: a key in a URL ends up in proxies' logs


def _http_error(exc: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own refusal (405, 413, a failed WebSocket handshake...) as OpenAI JSON, keeping its informative
    text as the message and its headers (a 405's ``Allow``), less those of its plain-text body."""
    text = " ".join((exc.text or "").split())
    is_informative = bool(text) and text != f"{exc.status}: {exc.reason}"  # aiohttp's default text says nothing more
    message = text if is_informative else f"{exc.reason}: {request.method} {request.path}"
    headers = {name: value for name, value in exc.headers.items()
               if name.lower() not in ("content-type", "content-length")}
    return ApiError(exc.status, message, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[STATE].metrics
    try:
        return await handler(request)
    except ApiError as exc:
        if not exc.is_admitted:
            metrics.on_rejected(exc.status)
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        metrics.on_rejected(exc.status)
        return _http_error(exc, request).response()
    except Exception as exc:  # a bug must cost one request, never the server
        log.exception("unexpected error in %s %s", request.method, request.path)
        metrics.on_rejected(500)
        return ApiError(500, f"internal error: {exc}").response()


def is_origin_allowed(config: FrontendConfig, origin: str) -> bool:
    return "*" in config.allowed_origins or origin in config.allowed_origins


def _allow_origin_headers(config: FrontendConfig, origin: str) -> dict[str, str]:
    """A credentialed response may not say ``*``: it names the Origin, and says it varies with it."""
    if "*" in config.allowed_origins and not config.is_credentials_allowed:
        return {"Access-Control-Allow-Origin": "*"}
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if config.is_credentials_allowed:
        headers["Access-Control-Allow-Credentials"] = "true"
    return headers


def _preflight(config: FrontendConfig, request: web.Request, origin: str) -> web.Response:
    method = request.headers["Access-Control-Request-Method"].strip()
    asked = request.headers.get("Access-Control-Request-Headers", "")
    asked_headers = [name.strip().lower() for name in asked.split(",") if name.strip()]
    is_any_header = "*" in config.allowed_headers
    allowed_headers = SAFELISTED_HEADERS | {name.lower() for name in config.allowed_headers}
    refused = [what for what, is_refused in (
        ("origin", not is_origin_allowed(config, origin)),
        ("method", "*" not in config.allowed_methods and method.upper() not in
         {name.upper() for name in config.allowed_methods}),
        ("headers", not is_any_header and any(name not in allowed_headers for name in asked_headers)),
    ) if is_refused]
    if refused:
        raise ApiError(400, f"CORS preflight refused: disallowed {', '.join(refused)} (see --allowed-origins, "
                            "--allowed-methods, --allowed-headers)", code="cors_refused")
    headers = _allow_origin_headers(config, origin)
    methods = ALL_METHODS if "*" in config.allowed_methods else config.allowed_methods
    headers["Access-Control-Allow-Methods"] = ", ".join(methods)
    headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
    if is_any_header:
        if asked.strip():
            headers["Access-Control-Allow-Headers"] = asked.strip()
    else:
        headers["Access-Control-Allow-Headers"] = ", ".join(sorted(allowed_headers))
    return web.Response(text="OK", headers=headers)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers a browser's preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) itself,
    before the key is checked or the route looked at; everything else goes on."""
    origin = request.headers.get("Origin")
    if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
        return _preflight(request.app[STATE].config, request, origin)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: an allowed Origin's response (JSON, error, SSE stream) gets the allow headers."""
    origin = request.headers.get("Origin")
    if origin is None or "Access-Control-Allow-Origin" in response.headers:
        return
    config = request.app[STATE].config
    if not is_origin_allowed(config, origin):
        return
    for name, value in _allow_origin_headers(config, origin).items():
        if name == "Vary" and "Vary" in response.headers:
            value = f"{response.headers['Vary']}, {value}"
        response.headers[name] = value


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
