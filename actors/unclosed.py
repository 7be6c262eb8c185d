"""What is let go of an AsyncLLM collected without ``stop()``, or of a SubmittedStream collected unclosed: its
cluster stopped, its request cancelled, on the loop they run on (collection may run on any thread)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastdecode.actors.cluster import Cluster

log = logging.getLogger("fastdecode.api")

STOP_HOLD_POLL_S = 1.0  # how often the holder of a dropped AsyncLLM's stop looks whether its loop was closed


def cancel_dropped(loop: asyncio.AbstractEventLoop, request) -> None:
    """A SubmittedStream collected unclosed: cancel its request on its loop (collection may run on any thread); a
    request that ended, or was closed, is left as it is."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: its Executor stopped with it
        loop.call_soon_threadsafe(request.cancel)


def release_unstopped(loop: asyncio.AbstractEventLoop | None, cluster: Cluster) -> None:
    """An AsyncLLM collected without stop(): warn, and stop its cluster on its loop if that is still open;
    once the loop is closed only the dense thread can be let go (the sockets and shards need the loop)."""
    warnings.warn("an AsyncLLM was collected without stop(): its cluster is stopped now if its event loop still "
                  "runs; use 'async with', or await llm.stop() (or llm.shutdown())", ResourceWarning, stacklevel=2)
    if loop is not None and not loop.is_closed():
        stop = cluster.stop()
        try:
            stopping = asyncio.run_coroutine_threadsafe(stop, loop)
        except RuntimeError:  # closed meanwhile: release what needs no loop, below
            stop.close()
        else:
            # asyncio holds tasks weakly, and what this task stops holds nothing outside it: a thread holds it
            threading.Thread(target=_hold_until_done, args=(stopping, loop), name="fastdecode-stop",
                             daemon=True).start()
            return
    cluster.executor.runner.close()


def _hold_until_done(stopping: concurrent.futures.Future, loop: asyncio.AbstractEventLoop) -> None:
    """Hold a dropped AsyncLLM's stop (its future, so its task) until it ends, or its loop closed without it."""
    while True:
        done, _ = concurrent.futures.wait([stopping], timeout=STOP_HOLD_POLL_S)
        if done:
            if not stopping.cancelled() and stopping.exception() is not None:
                log.warning("stopping the cluster of a dropped AsyncLLM failed", exc_info=stopping.exception())
            return
        if loop.is_closed():
            return
