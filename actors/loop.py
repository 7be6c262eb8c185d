"""Running an actor process's event loop: uvloop where installed, plain asyncio otherwise."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
from collections.abc import Iterator
from typing import Any, Coroutine


def has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def new_event_loop(*, use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop when asked for and installed, plain asyncio otherwise."""
    if use_uvloop and has_uvloop():
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_event_loop(main: Coroutine[Any, Any, Any], *, use_uvloop: bool = True) -> Any:
    """Run ``main`` to completion on a fresh event loop (uvloop when asked for and installed)."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(use_uvloop=use_uvloop)) as runner:
        return runner.run(main)


@contextlib.contextmanager
def stop_signals(stop: asyncio.Event, hurry: asyncio.Event) -> Iterator[None]:
    """While inside: the first SIGTERM/SIGINT sets ``stop`` (drain), the next sets ``hurry`` (stop draining)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: (hurry if stop.is_set() else stop).set())
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
