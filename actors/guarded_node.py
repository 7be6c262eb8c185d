"""A KV node as the Executor holds it: one connection epoch, and what became of it.

The Executor wraps every KV node in a ``GuardedNode``. A transport failure of the
node (no heartbeat answer, a timed-out request, a reply that does not decode, a shard
that lost its state, failed at a call or says it is draining) does not escape as an exception in the middle of a decode
step: the node is marked failed (``DEAD``) or ``DRAINING`` and its attends from
then on return zeros, so the step runs to its end for every other row and the
Executor drops the rows of the failed node (their sequences are rebuilt
elsewhere). Calls that place KV (allocate, append_prompt) raise
``NodeFailedError`` instead. A draining shard still serves the sequences it holds
(shard_drain.py): where no other node could take them, the Executor keeps it
(``is_kept``, set at a step boundary) and its attends go on until they fail.
Each (re)connection is a new ``GuardedNode`` with the next epoch; a sequence remembers the epoch it was placed in, and what belongs to
an older epoch is never sent to the new one.
"""
from __future__ import annotations

import enum
import logging

import numpy as np
import torch

from fastdecode.actors.kv_nodes import KVNode, NodeStats
from fastdecode.actors.shard_drain import DRAINING, NOT_SESSION_OWNER
from fastdecode.actors.tensor_io import from_numpy
from fastdecode.transport.control_messages import ACTOR_STOPPED, INTERNAL, PROTOCOL
from fastdecode.transport.errors import PeerDeadError, ProtocolError, RemoteRequestError, RequestTimeoutError

log = logging.getLogger("fastdecode.executor")

# Error replies meaning the shard no longer holds what this connection put there: kvshard's
# NOT_CONFIGURED and UNKNOWN_SEQUENCE (spelt out, not imported: the Executor does not load the
# native library; a test checks they agree) and the runtime's ACTOR_STOPPED.
UNKNOWN_SEQUENCE = "unknown_sequence"
LOST_STATE_CODES = frozenset({"not_configured", UNKNOWN_SEQUENCE, ACTOR_STOPPED})
# Error replies of a node that failed at what it was asked (a handler's unexpected error, the native library's,
# a request it could not decode or found malformed): what it holds for this connection can no longer be
# trusted, so the connection ends as if the node died (its sequences are rebuilt elsewhere and it is
# reconnected), rather than the error failing every running request, step after step.
# A shard that takes this connection for another session's (NOT_SESSION_OWNER) ends it the same way.
FAULT_CODES = frozenset({INTERNAL, PROTOCOL, "native_error", "bad_request", NOT_SESSION_OWNER})
# Error replies of an attend the node could not make room for (kvshard's POOL_FULL and OUT_OF_MEMORY): the
# node is fine, those rows' KV is not (earlier layers of the step appended, this one did not). The rows get
# zeros, and the Executor preempts their sequences and rebuilds them.
REFUSED_CODES = frozenset({"pool_full", "out_of_memory"})


class NodeState(enum.Enum):
    ALIVE = "alive"
    DRAINING = "draining"  # refuses new work, still frees: its sequences move away as planned
    DEAD = "dead"  # unreachable or lost its state: nothing more is sent to this epoch


class NodeFailedError(Exception):
    """A KV node failed or is draining; the Executor moves its sequences away."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(f"KV node {node_id}: {reason}")
        self.node_id = node_id
        self.reason = reason


def classify_failure(exc: BaseException) -> NodeState | None:
    """The node state an error of one call implies, or None if it is not a node failure."""
    if isinstance(exc, (PeerDeadError, RequestTimeoutError, ProtocolError)):
        return NodeState.DEAD
    if isinstance(exc, RemoteRequestError):
        if exc.code == DRAINING:
            return NodeState.DRAINING
        if exc.code in LOST_STATE_CODES or exc.code in FAULT_CODES:
            return NodeState.DEAD
    return None


async def free_leftovers(node: KVNode, seq_ids: list[int]) -> None:
    """Free what a lost epoch may have left on a node that came back (a restarted shard holds none of it). A shard
    frees all of a Free or nothing (an unknown id): then each is freed on its own."""
    try:
        await node.free(seq_ids)
    except RemoteRequestError as exc:
        if exc.code != UNKNOWN_SEQUENCE:
            raise
        log.info("KV node %s did not hold some of %d leftover sequence(s): %s", node.node_id, len(seq_ids),
                 exc.message)
        if len(seq_ids) > 1:
            for seq_id in seq_ids:
                await free_leftovers(node, [seq_id])


class GuardedNode(KVNode):
    """One epoch of a KV node; see the module docstring."""

    def __init__(self, inner: KVNode, *, epoch: int) -> None:
        self.inner = inner
        self.epoch = epoch
        self.node_id = inner.node_id
        self.is_host = inner.is_host
        self.can_attend_now = inner.can_attend_now
        self.state = NodeState.ALIVE
        self.failure: str | None = None
        self.is_retired = False  # the Executor has moved this epoch's sequences away
        self.is_kept = False  # DRAINING, but still attending for its sequences (no other node could take them)
        self.has_lost_attend = False  # an attend failed: what it held may be half-appended, it cannot be kept
        self.refused_seq_ids: set[int] = set()  # attends refused for want of room, since take_refused()
        self.is_closed = False

    @property
    def is_alive(self) -> bool:
        return self.state is NodeState.ALIVE

    @property
    def can_be_kept(self) -> bool:
        """Draining (told by a refused allocation, not a refused attend): its sequences' KV is whole there."""
        return self.state is NodeState.DRAINING and not self.has_lost_attend

    @property
    def can_attend(self) -> bool:
        """Alive, or draining and kept serving the sequences it holds."""
        return self.state is NodeState.ALIVE or (self.state is NodeState.DRAINING and self.is_kept)

    @property
    def client(self):
        """The ShardClient of a shard node (AttributeError for a local node)."""
        return self.inner.client

    @property
    def is_answering(self) -> bool:
        """Not dead, and (for a shard) its heartbeats still answered: a heartbeat loss shows here at once, while
        the Executor marks the node dead only at its next ``refresh``, a step boundary."""
        if self.state is NodeState.DEAD:
            return False
        return self._shard_client is None or self._shard_client.is_alive

    @property
    def _shard_client(self):
        """The shard client of a node over ZeroMQ (its heartbeats); None for a node on the Executor's device."""
        return getattr(self.inner, "client", None)

    def refresh(self) -> None:
        """Notice what the heartbeats told between calls: a loss (of a live node, or a draining one kept serving),
        or a shard that drains (its Pongs say so)."""
        if (self.is_alive or self.is_kept) and not self.is_answering:
            self.mark(NodeState.DEAD, "no heartbeat answer")
        elif self.is_alive and self._shard_client is not None and self._shard_client.is_draining:
            self.mark(NodeState.DRAINING, "its heartbeat says it drains")

    def mark(self, state: NodeState, reason: str) -> None:
        """Move to DRAINING or DEAD (never back: a node that returns is a new epoch)."""
        if self.state is NodeState.DEAD or state is NodeState.ALIVE or state is self.state:
            return
        self.state = state
        self.failure = reason
        level = logging.INFO if state is NodeState.DRAINING else logging.WARNING
        log.log(level, "KV node %s (epoch %d) is %s: %s", self.node_id, self.epoch, state.value, reason)

    def _failed(self, exc: BaseException) -> NodeFailedError | None:
        state = classify_failure(exc)
        if state is None:
            return None
        self.mark(state, f"{type(exc).__name__}: {exc}")
        return NodeFailedError(self.node_id, self.failure or str(exc))

    def _attend_failed(self, exc: BaseException) -> bool:
        """An attend failed: True (the node marked) if the error is the node's. A kept draining node that
        fails an attend (say its drain deadline passed) is kept no longer, with that error as its reason."""
        if self._failed(exc) is None:
            return False
        self.has_lost_attend = True
        if self.is_kept:
            self.is_kept = False
            self.failure = f"{type(exc).__name__}: {exc}"
            log.warning("KV node %s (epoch %d) stopped serving its sequences: %s", self.node_id, self.epoch,
                        self.failure)
        return True

    def _require_alive(self) -> None:
        if not self.is_alive:
            raise NodeFailedError(self.node_id, self.failure or self.state.value)

    async def allocate(self, seq_ids: list[int]) -> None:
        self._require_alive()
        try:
            await self.inner.allocate(seq_ids)
        except Exception as exc:
            failed = self._failed(exc)
            if failed is None:
                raise
            raise failed from exc

    async def append_prompt(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._require_alive()
        try:
            await self.inner.append_prompt(seq_id, k, v)
        except Exception as exc:
            failed = self._failed(exc)
            if failed is None:
                raise
            raise failed from exc

    async def attend(self, layer: int, seq_ids: np.ndarray, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
        """The node's output, or zeros once it failed (the Executor drops those rows)."""
        if self.can_attend:
            try:
                return await self.inner.attend(layer, seq_ids, q, k, v)
            except Exception as exc:
                if not self._attend_failed(exc):
                    raise
        return torch.zeros_like(q)

    def attend_now(self, layer: int, seq_ids: np.ndarray, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
        """A local node's attend on the caller's thread (local nodes do not fail over)."""
        return self.inner.attend_now(layer, seq_ids, q, k, v)

    def _refused(self, exc: BaseException, seq_ids: np.ndarray) -> bool:
        """True (and the rows remembered in ``refused_seq_ids``) when the node had no room for this attend."""
        if not (isinstance(exc, RemoteRequestError) and exc.code in REFUSED_CODES):
            return False
        self.refused_seq_ids.update(int(s) for s in seq_ids)
        log.warning("KV node %s refused an attend of %d row(s): %s", self.node_id, len(seq_ids), exc)
        return True

    def take_refused(self) -> set[int]:
        """The sequences whose attends this node refused since the last call."""
        refused, self.refused_seq_ids = self.refused_seq_ids, set()
        return refused

    def begin_attend(self, layer: int, seq_ids: np.ndarray, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[object | None, torch.Tensor, np.ndarray]:
        """(the inner node's pending attend, or None once the node failed; q for the zeros of a failed
        one; the rows' sequence ids)."""
        if self.can_attend:
            try:
                return self.inner.begin_attend(layer, seq_ids, q, k, v), q, seq_ids
            except Exception as exc:
                if not self._refused(exc, seq_ids) and not self._attend_failed(exc):
                    raise
        return None, q, seq_ids

    def end_attend(self, pending: tuple[object | None, torch.Tensor, np.ndarray]) -> torch.Tensor:
        """The node's output, or zeros once it failed or refused (the Executor drops those rows)."""
        inner_pending, q, seq_ids = pending
        if inner_pending is not None and self.can_attend:
            try:
                return self.inner.end_attend(inner_pending)
            except Exception as exc:
                if not self._refused(exc, seq_ids) and not self._attend_failed(exc):
                    raise
        return from_numpy(np.zeros(q.shape, q.dtype)) if isinstance(q, np.ndarray) else torch.zeros_like(q)

    def is_attend_done(self, pending: tuple[object | None, torch.Tensor, np.ndarray]) -> bool:
        inner_pending = pending[0]
        return inner_pending is None or not self.can_attend or self.inner.is_attend_done(inner_pending)

    async def free(self, seq_ids: list[int]) -> None:
        """Free on a live or draining node; raises NodeFailedError when the node is (or turns out) dead."""
        if self.state is NodeState.DEAD:
            raise NodeFailedError(self.node_id, self.failure or "dead")
        try:
            await self.inner.free(seq_ids)
        except Exception as exc:
            state = classify_failure(exc)
            if state is None:
                raise
            if state is NodeState.DEAD:
                self.mark(state, f"{type(exc).__name__}: {exc}")
                raise NodeFailedError(self.node_id, self.failure or str(exc)) from exc
            # a draining node refusing a free is not expected (it frees to drain); the KV stays there
            log.warning("KV node %s refused to free %s: %s", self.node_id, seq_ids, exc)

    async def stats(self) -> NodeStats:
        if self.state is NodeState.DEAD:
            raise NodeFailedError(self.node_id, self.failure or "dead")
        return await self.inner.stats()

    async def close(self) -> None:
        """Close the inner node once (a retired one is closed when it leaves, and again by nothing)."""
        if not self.is_closed:
            self.is_closed = True
            await self.inner.close()
