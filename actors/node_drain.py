"""Draining KV nodes as the Executor sees them: finding out, and whether one keeps serving what it holds.

A shard daemon that got SIGTERM (actors/shard_drain.py) refuses new sequences with ``draining`` but still
attends for the ones it holds, until they are gone or its drain deadline passes. The Executor learns of the
drain when one of its allocations is refused, or from the shard's heartbeats: every Pong says whether its server
drains (``Pong.is_draining``), and ``GuardedNode.refresh`` marks the node at the next step boundary, so no request
of its own waits in the step.

At a step boundary (``retire_nodes``) a draining node leaves like a failed one when the other live nodes
of the scheduler could take its sequences: they have room now for all of them, as admission would place them
(``Scheduler.can_relieve``); its sequences are requeued, rebuilt there, and freed on it. Otherwise (no other
live node, or none with room: the others are full) it is *kept* (``GuardedNode.is_kept``): its sequences go on
decoding there, it takes no new one (it is closed in the scheduler, and the Executor refuses new requests while
no node is live), and it leaves as soon as the live nodes have room for what it still holds (one came back,
room freed, its own sequences finished) or it fails (its drain deadline passed, or it died).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from fastdecode.actors.executor_config import KVNodesDrainingError, UnavailableError
from fastdecode.actors.guarded_node import GuardedNode
from fastdecode.scheduler import Scheduler

log = logging.getLogger("fastdecode.executor")


def retire_nodes(nodes: Sequence[GuardedNode], scheduler: Scheduler, placed_on: Iterable[int | None]) -> list[int]:
    """Mark retired (and log) the failed or draining nodes whose sequences leave now; their indices.
    ``placed_on``: the node index of each live sequence (None: not placed), for the log. A draining node is kept
    instead while the live nodes of the scheduler have no room for its sequences (all of them, beside those of the
    nodes leaving before it: ``Scheduler.can_relieve``); a kept one leaves once they have, or once it failed an
    attend or died. Nothing is read when every node is alive or retired (most steps)."""
    if all(node.is_alive or node.is_retired for node in nodes):
        return []
    live = [i for i in scheduler.nodes if nodes[i].is_alive]
    leaving = [i for i, node in enumerate(nodes) if not (node.is_alive or node.is_retired or node.can_be_kept)]
    num_held = Counter(placed_on)
    for index, node in enumerate(nodes):
        if node.is_alive or node.is_retired or not node.can_be_kept:
            continue
        if live and scheduler.can_relieve(leaving + [index], live):
            leaving.append(index)
        elif not node.is_kept:
            log.warning("KV node %d (%s) is draining and no other node has room for its %d sequence(s): it keeps "
                        "serving them, and takes no new one, until they finish, room frees elsewhere or it stops",
                        index, node.node_id, num_held[index])
            node.is_kept = True
    for index in sorted(leaving):
        node = nodes[index]
        node.is_kept = False
        node.is_retired = True
        log.warning("KV node %d (%s) leaves: %s; %d sequence(s) to rebuild elsewhere", index, node.node_id,
                    node.failure, num_held[index])
    return sorted(leaving)


def no_live_node_error(nodes: Sequence[GuardedNode]) -> UnavailableError:
    """Why a new request is refused while no node is alive: the nodes left drain (kept serving what they hold), or
    none answers."""
    if any(node.is_kept for node in nodes):
        return KVNodesDrainingError("the KV nodes left are draining (their shard daemons are stopping) and take no "
                                    "new sequence; retry when another returns")
    return UnavailableError("no KV node is reachable; retry when one returns")
