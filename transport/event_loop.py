"""A fresh event loop for a process or a thread: uvloop where installed, plain asyncio otherwise."""
from __future__ import annotations

import asyncio
import importlib.util
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
