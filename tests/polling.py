"""Polling until a condition holds, for any async test of the suite (tests/ is on sys.path: ``from polling import
until``)."""
from __future__ import annotations

import asyncio


async def until(condition, timeout_s: float = 2.0) -> float:
    """Seconds until ``condition()`` held (polled on the loop); fails after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        assert loop.time() - start < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.005)
    return loop.time() - start
