"""A KVShard that can drain: on SIGTERM a shard daemon first lets the Executor move its sequences away.

Once ``is_draining`` is set, every request that would place or use KV
(Configure, Allocate, AppendPrompt, Attend) is refused with the error code
``draining``; Free and GetStats are still served. The Executor takes that code
as a planned removal: it stops sending work there, rebuilds the shard's
sequences on the other nodes and frees them here. The daemon exits when the
shard holds no sequence any more, at its drain deadline, or once no request
came for a while (no Executor is left to move them: one that runs sequences
here sends attends every step) -- counted from the drain's start at the earliest,
so that a shard idle before the signal still gives the Executor that long to react.

Activity is the last request of any kind but GetStats: a stats poll is no
sequence work, and a monitor polling a shard whose Executor is gone must neither
hold its drain open nor keep a new Executor out. The same clock decides whether
the Executor that holds the sequences is still there when another client session
sends Configure (``KVShard.on_configure``'s ``holder_idle_s``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from fastdecode.actors.runtime import ActorError
from fastdecode.transport.shard_messages import (
    Allocate,
    AppendPrompt,
    Attend,
    AttendResult,
    Configure,
    Free,
    GetStats,
    ShardStats,
)

if TYPE_CHECKING:  # the Executor imports DRAINING without loading the native library
    from fastdecode.actors.kvshard import KVShard

log = logging.getLogger(__name__)

DRAINING = "draining"  # the ErrorReply code of a draining shard
DRAIN_POLL_S = 0.05
DRAIN_IDLE_S = 2.0  # draining with no request for this long: no Executor is moving the sequences


class DrainableShard:
    """Delegates to a KVShard; handlers run on the actor's one worker thread."""

    def __init__(self, shard: "KVShard") -> None:
        self.shard = shard
        self.is_draining = False  # set from the event loop; read by handlers (a plain bool)
        self.last_request_s = time.monotonic()  # when a handler other than GetStats last ran
        # seconds since a heartbeat tagged with a session came (the daemon's ActorServer.seconds_since_ping)
        self.seconds_since_ping: Callable[[int], float | None] | None = None

    def seconds_since_request(self) -> float:
        return time.monotonic() - self.last_request_s

    @property
    def num_sequences(self) -> int:
        """What the shard holds, whoever freed it: a new client session's Configure frees the old one's."""
        return self.shard.num_sequences

    def _refuse_if_draining(self) -> None:
        self.last_request_s = time.monotonic()
        if self.is_draining:
            raise ActorError(DRAINING, "this shard is shutting down; move its sequences elsewhere")

    def on_configure(self, message: Configure) -> ShardStats:
        previous_s = self.last_request_s
        self._refuse_if_draining()
        try:
            holder = self.shard.session_id
            holder_ping_s = self.seconds_since_ping(holder) if self.seconds_since_ping and holder else None
            return self.shard.on_configure(message, holder_idle_s=self.last_request_s - previous_s,
                                           holder_ping_s=holder_ping_s)
        except ActorError:
            self.last_request_s = previous_s  # a refused Configure is no activity of the session holding the shard
            raise

    def on_allocate(self, message: Allocate) -> None:
        self._refuse_if_draining()
        self.shard.on_allocate(message)

    def on_free(self, message: Free) -> None:
        self.last_request_s = time.monotonic()
        self.shard.on_free(message)

    def on_append_prompt(self, message: AppendPrompt) -> None:
        self._refuse_if_draining()
        self.shard.on_append_prompt(message)

    def on_attend(self, message: Attend) -> AttendResult:
        self._refuse_if_draining()
        return self.shard.on_attend(message)

    def on_get_stats(self, message: GetStats) -> ShardStats:
        return self.shard.on_get_stats(message)

    def close(self) -> None:
        self.shard.close()


async def drain(shard: DrainableShard, *, timeout_s: float, hurry: asyncio.Event, idle_s: float = DRAIN_IDLE_S,
                poll_s: float = DRAIN_POLL_S) -> int:
    """Refuse new work, then wait until the shard holds no sequence, ``timeout_s`` passed, ``hurry`` is set, or
    no request came for ``idle_s`` since the later of the last request and the drain's start; the sequences left."""
    shard.is_draining = True
    started_s = time.monotonic()
    deadline_s = started_s + timeout_s
    while shard.num_sequences and time.monotonic() < deadline_s and not hurry.is_set():
        if time.monotonic() - max(shard.last_request_s, started_s) > idle_s:
            log.warning("no Executor is moving the sequences away")
            break
        await asyncio.sleep(poll_s)
    return shard.num_sequences
