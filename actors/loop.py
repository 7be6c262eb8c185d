"""Running an actor process's event loop: uvloop where installed, plain asyncio otherwise."""
from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, Coroutine


def has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def run_event_loop(main: Coroutine[Any, Any, Any], *, use_uvloop: bool = True) -> Any:
    """Run ``main`` to completion on a fresh event loop (uvloop when asked for and installed)."""
    loop_factory = None
    if use_uvloop and has_uvloop():
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)
