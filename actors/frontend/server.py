"""Running the Frontend: bind, start the cluster, serve until asked to stop, stop cleanly.

The port is bound first, so ``/health`` answers 503 while the model loads and
200 once it can serve.  SIGTERM and SIGINT (or the ``stop`` event) start a
graceful stop: new requests get 503 at once, the accepted ones run to their end
for up to ``drain_timeout_s``, then the engine stops (requests still unfinished
end with an error) and the server closes.  A second signal skips the rest of the
drain.

Each HTTP request leaves one INFO line on ``fastdecode.frontend.access`` (``AccessLog``) unless
``is_access_logged`` is off: client address, method, path (never its query string: a WebSocket's
``?token=`` key stays out of the logs; no header either), status, response bytes and seconds; a request
whose client left midway (its handler cancelled) is logged with status 499, as nginx does.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.frontend.app import build_app
from fastdecode.actors.frontend.middleware import Handler
from fastdecode.actors.frontend.state import FrontendConfig, FrontendState
from fastdecode.actors.loop import stop_signals

log = logging.getLogger("fastdecode.frontend")

SHUTDOWN_TIMEOUT_S = 5.0
ACCESS_LOG_NAME = "fastdecode.frontend.access"
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
CANCELLED_STATUS = 499  # nginx's "client closed request": in the access line of a handler cancelled midway


@dataclass(frozen=True)
class ServeConfig:
    cluster: ClusterConfig
    frontend: FrontendConfig
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready callback gets the real one)
    drain_timeout_s: float = 30.0  # on SIGTERM, how long accepted requests may still run
    is_access_logged: bool = True  # one INFO line per HTTP request (AccessLog)

    def __post_init__(self) -> None:
        if not 0 <= self.drain_timeout_s <= 24 * 3600:
            raise ValueError(f"drain timeout must be in [0, 86400] s, got {self.drain_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty")


async def serve(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT or ``stop`` is set; ``on_ready(url)`` runs once requests can be served."""
    stop = stop or asyncio.Event()
    hurry = asyncio.Event()  # a second signal: stop draining
    with stop_signals(stop, hurry):
        await _serve(config, on_ready, stop, hurry)


async def _serve(config: ServeConfig, on_ready: Callable[[str], None] | None, stop: asyncio.Event,
                 hurry: asyncio.Event) -> None:
    state = FrontendState(config.frontend)
    runner = app_runner(build_app(state), is_access_logged=config.is_access_logged)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        port = runner.addresses[0][1]
        llm = await _start_unless_stopped(config.cluster, stop)
        if llm is None:
            return
        try:
            state.llm = llm
            if on_ready is not None:
                on_ready(f"http://{config.host}:{port}")
            await stop.wait()
            await _drain(state, llm, config.drain_timeout_s, hurry)
            log.info("stopping")
        finally:
            state.llm = None
            await llm.stop()
    finally:
        await runner.cleanup()


class AccessLog(AbstractAccessLogger):
    """aiohttp's access-log hook with a fixed line: ``CLIENT "METHOD PATH" STATUS BYTES SECONDS``.  The path is
    the raw (still percent-encoded, so one-line) path without its query string; aiohttp's own ``%r`` would log
    the query (a WebSocket's ``?token=`` key), so its format strings are not used."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        _log_line(self.logger, request, response.status, response.body_length, time)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _log_line(logger: logging.Logger, request: web.BaseRequest, status: int, num_bytes: int | str,
              time: float) -> None:
    logger.info('%s "%s %s" %d %s %.3f', request.remote or "-", request.method, request.rel_url.raw_path, status,
                num_bytes, time)


def _cancelled_requests_logged(logger: logging.Logger) -> Middleware:
    """A middleware giving a handler cancelled midway (its client left, or the server stopped) the access line
    aiohttp leaves out: status ``CANCELLED_STATUS``, bytes ``-``."""

    @web.middleware
    async def log_cancelled(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = asyncio.get_running_loop().time()
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if logger.isEnabledFor(logging.INFO):
                _log_line(logger, request, CANCELLED_STATUS, "-", asyncio.get_running_loop().time() - start)
            raise

    return log_cancelled


def app_runner(app: web.Application, *, is_access_logged: bool) -> web.AppRunner:
    """The runner ``serve`` starts ``app`` with: handlers cancelled when their client leaves, and unless
    ``is_access_logged`` is off, one ``AccessLog`` line per request, a cancelled one's included."""
    access_log = logging.getLogger(ACCESS_LOG_NAME) if is_access_logged else None
    if access_log is not None:
        app.middlewares.insert(0, _cancelled_requests_logged(access_log))  # outermost: it sees every cancellation
    return web.AppRunner(app, handler_cancellation=True, access_log=access_log, access_log_class=AccessLog,
                         shutdown_timeout=SHUTDOWN_TIMEOUT_S)


async def _drain(state: FrontendState, llm: AsyncLLM, timeout_s: float, hurry: asyncio.Event) -> None:
    """New requests get 503; accepted ones run until done, ``timeout_s`` or ``hurry``."""
    state.is_draining = True
    executor = llm.cluster.executor
    log.info("draining: %d request(s) to finish (deadline %.0f s)", executor.num_waiting + executor.num_running,
             timeout_s)
    draining = asyncio.create_task(executor.drain(timeout_s))
    hurrying = asyncio.create_task(hurry.wait())
    await asyncio.wait({draining, hurrying}, return_when=asyncio.FIRST_COMPLETED)
    hurrying.cancel()
    if not draining.done():
        draining.cancel()
        log.warning("drain cut short by a second signal")
    with contextlib.suppress(asyncio.CancelledError):
        await draining


async def _start_unless_stopped(cluster: ClusterConfig, stop: asyncio.Event) -> AsyncLLM | None:
    """The started engine, or None if a stop came first (the start is then abandoned)."""
    starting = asyncio.create_task(AsyncLLM.start(cluster))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        return starting.result()
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        llm = await starting
        await llm.stop()  # it came up while being cancelled
    return None
