"""Running the Frontend: bind, start the cluster, serve until asked to stop, stop cleanly.

The port is bound first, so ``/health`` answers 503 while the model loads and
200 once it can serve.  SIGTERM and SIGINT (or the ``stop`` event) end the
serving: the engine is detached (new requests get 503), in-flight requests end
with an error, then the server closes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.frontend.app import build_app
from fastdecode.actors.frontend.state import FrontendConfig, FrontendState

log = logging.getLogger("fastdecode.frontend")

SHUTDOWN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ServeConfig:
    cluster: ClusterConfig
    frontend: FrontendConfig
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready callback gets the real one)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty")


async def serve(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT or ``stop`` is set; ``on_ready(url)`` runs once requests can be served."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    state = FrontendState(config.frontend)
    runner = web.AppRunner(build_app(state), handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
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
            log.info("stopping")
        finally:
            state.llm = None
            await llm.stop()
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


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
