"""A KVShard that can drain: on SIGTERM a shard daemon first lets the Executor move its sequences away.

Once ``is_draining`` is set, every request that would place a new sequence
(Configure, Allocate) is refused with the error code ``draining``, and every Pong
says the server drains; the sequences the shard holds are still served
(AppendPrompt, Attend, Free), and so is GetStats. The Executor takes either as
a planned removal: where another node can take the sequences it rebuilds them
there and frees them here; where none can (this is its last node) it keeps
decoding them here (actors/node_drain.py). The daemon exits when the shard holds
no sequence any more, at its drain deadline, or once no request came for a while
and the heartbeats of the session that holds the sequences stopped (no Executor
is left to move them: one that runs sequences here sends attends every step) --
counted from the drain's start at the earliest, so that a shard idle before the
signal still gives the Executor that long to react. At the deadline every request
but Free and GetStats is refused ``draining`` with a message saying the deadline
passed, and the daemon waits a moment for the Executor to hear it.

A shard serves one client session (an Executor) at a time: ``admit`` (the server's
hook, on the loop, before a request is queued) refuses a request that touches KV
(Allocate, Free, AppendPrompt, Attend) with ``not_session_owner`` unless its peer
(socket) belongs to the session the shard serves: its Pings carry that session's id
(a ShardClient declares its session so before its Configure, and its attend link
when it is made). Configure keeps its own rule (``busy`` while the holder is live) and
GetStats is anyone's.

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

from fastdecode.actors.runtime import ActorError, ActorServer
from fastdecode.transport.control_messages import ErrorReply
from fastdecode.transport.messages import Message
from fastdecode.transport.shard_messages import (
    Allocate,
    AppendPrompt,
    Attend,
    AttendResult,
    Configure,
    Free,
    GetStats,
    SHARD_CHANNEL,
    ShardStats,
)

if TYPE_CHECKING:  # the Executor imports DRAINING without loading the native library
    from fastdecode.actors.kvshard import KVShard

log = logging.getLogger(__name__)

DRAINING = "draining"  # the ErrorReply code of a draining shard
NOT_SESSION_OWNER = "not_session_owner"  # the ErrorReply code of a request from outside the shard's session
DRAIN_POLL_S = 0.05
DRAIN_IDLE_S = 2.0  # draining with no request, nor heartbeat, for this long: no Executor is moving the sequences
DRAIN_GRACE_S = 0.5  # past the deadline: how long the Executor has to hear it before the daemon goes


class DrainableShard:
    """Delegates to a KVShard; handlers run on the actor's one worker thread."""

    def __init__(self, shard: "KVShard") -> None:
        self.shard = shard
        self.is_draining = False  # set from the event loop; read by handlers (a plain bool)
        # once the drain's deadline passed, its timeout (for the refusals' message): everything is refused
        self.timed_out_after_s: float | None = None
        self.has_refused_late = False  # a request was refused since the deadline passed
        self.last_request_s = time.monotonic()  # when a handler other than GetStats last ran
        # seconds since a heartbeat tagged with a session came (the daemon's ActorServer.seconds_since_ping)
        self.seconds_since_ping: Callable[[int], float | None] | None = None

    def seconds_since_request(self) -> float:
        return time.monotonic() - self.last_request_s

    @property
    def num_sequences(self) -> int:
        """What the shard holds, whoever freed it: a new client session's Configure frees the old one's."""
        return self.shard.num_sequences

    def seconds_since_holder_ping(self) -> float | None:
        """Seconds since a heartbeat of the session the shard serves came (None: none known)."""
        holder = self.shard.session_id
        return self.seconds_since_ping(holder) if self.seconds_since_ping and holder else None

    def admit(self, peer: bytes, client_id: int, message: Message) -> ErrorReply | None:
        """The server's hook (transport/server.py): None lets the request through; ``client_id`` is the session
        the peer's Pings declared (0: none; a ShardClient declares its session before its Configure, and its
        attend link when it is made). Configure itself goes through: the shard decides whether a new session may
        take over (``busy``)."""
        holder = self.shard.session_id
        if isinstance(message, (Configure, GetStats)) or not holder or holder == client_id:
            return None
        return ErrorReply(NOT_SESSION_OWNER, f"this shard serves another client session (Executor); "
                                             f"{type(message).__name__} is taken only from that session's "
                                             "connections")

    def _refuse_if_draining(self) -> None:
        """A new sequence: refused once the drain started."""
        self._refuse_if_late()
        if self.is_draining:
            raise ActorError(DRAINING, "this shard is shutting down and takes no new sequence; move its sequences "
                                       "elsewhere")

    def _refuse_if_late(self) -> None:
        """Work on a sequence the shard holds: refused once the drain deadline passed."""
        self.last_request_s = time.monotonic()
        if self.timed_out_after_s is not None:
            self.has_refused_late = True
            raise ActorError(DRAINING, f"this shard is shutting down: its drain deadline "
                                       f"({self.timed_out_after_s:g} s) passed and the sequences it holds are lost")

    def on_configure(self, message: Configure) -> ShardStats:
        previous_s = self.last_request_s
        self._refuse_if_draining()
        try:
            return self.shard.on_configure(message, holder_idle_s=self.last_request_s - previous_s,
                                           holder_ping_s=self.seconds_since_holder_ping())
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
        self._refuse_if_late()  # only a sequence allocated before the drain gets here
        self.shard.on_append_prompt(message)

    def on_attend(self, message: Attend) -> AttendResult:
        self._refuse_if_late()
        return self.shard.on_attend(message)

    def on_get_stats(self, message: GetStats) -> ShardStats:
        return self.shard.on_get_stats(message)

    def close(self) -> None:
        self.shard.close()


async def drain(shard: DrainableShard, *, timeout_s: float, hurry: asyncio.Event, idle_s: float = DRAIN_IDLE_S,
                poll_s: float = DRAIN_POLL_S, grace_s: float = DRAIN_GRACE_S) -> int:
    """Refuse new sequences, then wait until the shard holds none, ``timeout_s`` passed, ``hurry`` is set, or
    no request came for ``idle_s`` since the later of the last request and the drain's start while no heartbeat
    of the holding session came for as long; the sequences left. Past the deadline with sequences left, refuse
    everything and wait up to ``grace_s`` for the Executor to hear it (the daemon stops next)."""
    shard.is_draining = True
    started_s = time.monotonic()
    deadline_s = started_s + timeout_s
    while shard.num_sequences and time.monotonic() < deadline_s and not hurry.is_set():
        ping_s = shard.seconds_since_holder_ping()
        if time.monotonic() - max(shard.last_request_s, started_s) > idle_s and (ping_s is None or ping_s > idle_s):
            log.warning("no Executor is moving the sequences away")
            return shard.num_sequences
        await asyncio.sleep(poll_s)
    if shard.num_sequences and not hurry.is_set():
        log.warning("drain deadline (%g s) passed with %d sequence(s) still here", timeout_s, shard.num_sequences)
        shard.timed_out_after_s = timeout_s
        grace_end_s = time.monotonic() + grace_s
        while not shard.has_refused_late and time.monotonic() < grace_end_s and not hurry.is_set():
            await asyncio.sleep(poll_s)
        await asyncio.sleep(poll_s)  # the refusal's reply leaves the worker before the daemon stops
    return shard.num_sequences


def drainable_server(actor: DrainableShard, address: str, *, ctx=None) -> ActorServer:
    """The shard daemon's server (cli/start_shard.py): KV requests only from the connections of the session the
    shard serves (``admit``), every Pong saying whether it drains, its heartbeats feeding the idle clock."""
    server = ActorServer(actor, SHARD_CHANNEL, address, ctx=ctx, name="kvshard", admit=actor.admit,
                         is_draining=lambda: actor.is_draining)
    actor.seconds_since_ping = server.seconds_since_ping  # a live but idle Executor keeps the shard
    return server
