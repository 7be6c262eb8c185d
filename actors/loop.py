"""Process lifecycle for actor daemons: stop and drain on signals."""
from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator


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
