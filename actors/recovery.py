"""Reconnecting failed KV nodes in the background, with a capped back-off.

A node that failed (or drained) is retried by calling its factory (for a shard:
connect to the same address, wait for a heartbeat answer, send Configure) every
``initial_s``, doubling up to ``max_s``, until it succeeds or the Executor stops.
A node that came back is handed over through ``take_ready()``, which the
Executor calls at a step boundary (so no state change is split by an await).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fastdecode.actors.guarded_node import free_leftovers
from fastdecode.actors.kv_nodes import KVNode, NodeStats

log = logging.getLogger("fastdecode.executor")

QUIET_AFTER_ATTEMPTS = 5  # a node's failed reconnects are logged at INFO this often, then at DEBUG

NodeFactory = Callable[[], Awaitable[KVNode]]


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.1
    max_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")


class Reconnector:
    """One background task per failed node that has a factory."""

    def __init__(self, factories: Sequence[NodeFactory | None], *, on_ready: Callable[[], None],
                 backoff: Backoff = Backoff()) -> None:
        self._factories = list(factories)
        self._on_ready = on_ready
        self._backoff = backoff
        self._tasks: dict[int, asyncio.Task] = {}
        self._ready: list[tuple[int, KVNode]] = []
        self._is_closed = False

    def can_reconnect(self, index: int) -> bool:
        return index < len(self._factories) and self._factories[index] is not None

    def watch(self, index: int) -> None:
        """Start reconnecting node ``index`` (no-op if it has no factory, is already being retried, or the
        reconnector is closed)."""
        if self._is_closed or not self.can_reconnect(index) or index in self._tasks:
            return
        self._tasks[index] = asyncio.get_running_loop().create_task(self._reconnect(index),
                                                                    name=f"fastdecode-reconnect-{index}")

    def take_ready(self) -> list[tuple[int, KVNode]]:
        """Nodes that came back since the last call: (index, fresh node)."""
        ready, self._ready = self._ready, []
        return ready

    async def _reconnect(self, index: int) -> None:
        factory = self._factories[index]
        assert factory is not None
        delay = self._backoff.initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                node = await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure to come back is retried; the reason is logged
                level = logging.INFO if attempt <= QUIET_AFTER_ATTEMPTS else logging.DEBUG  # gone for good, maybe
                log.log(level, "KV node %d not back yet (attempt %d): %s: %s", index, attempt, type(exc).__name__,
                        exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff.max_s)
                continue
            log.info("KV node %d is back (%s) after %d attempt(s)", index, node.node_id, attempt)
            self._tasks.pop(index, None)
            self._ready.append((index, node))
            self._on_ready()
            return

    async def close(self) -> None:
        """Stop retrying, for good; close nodes that came back but were never taken."""
        self._is_closed = True
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, node in self.take_ready():
            await node.close()


async def reopen(index: int, fresh: KVNode, orphans: list[int]) -> NodeStats | None:
    """Node ``index`` came back as ``fresh``: free what a lost epoch of it may have left there (``orphans``) and
    read its stats; None (``fresh`` closed) when it fails again at once."""
    try:
        if orphans:
            await free_leftovers(fresh, orphans)
        return await fresh.stats()
    except Exception as exc:  # any failure: the caller retries the node later; the reason is logged
        log.warning("KV node %d failed again while coming back: %s: %s", index, type(exc).__name__, exc)
        await fresh.close()
        return None
    except asyncio.CancelledError:  # the Executor stops: nothing else holds the fresh client (its heartbeats)
        await fresh.close()
        raise
