"""Draining KV nodes as the Executor sees them: finding out, and whether one keeps serving what it holds.

A shard daemon that got SIGTERM (actors/shard_drain.py) refuses new sequences with ``draining`` but still
attends for the ones it holds, until they are gone or its drain deadline passes. The Executor learns of the
drain when one of its allocations is refused, or from the shard's heartbeats: every Pong says whether its server
drains (``Pong.is_draining``), and ``GuardedNode.refresh`` marks the node at the next step boundary, so no request
of its own waits in the step.

At a step boundary (``retire_nodes``) a draining node leaves like a failed one when some other live node
of the scheduler could take its sequences: they are requeued, rebuilt there, and freed on it. With no such
node it is *kept* (``GuardedNode.is_kept``): its sequences go on decoding there, it takes no new one (it is
closed in the scheduler, and the Executor refuses new requests while no node is live), and it
leaves as soon as another node is live (one came back) or it fails (its drain deadline passed, or it died).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from fastdecode.actors.executor_config import KVNodesDrainingError, UnavailableError
from fastdecode.actors.guarded_node import GuardedNode

log = logging.getLogger("fastdecode.executor")


def retire_nodes(nodes: Sequence[GuardedNode], in_scheduler: Iterable[int],
                 placed_on: Iterable[int | None]) -> list[int]:
    """Mark retired (and log) the failed or draining nodes whose sequences leave now; their indices.
    ``placed_on``: the node index of each live sequence (None: not placed). A draining node is kept instead while
    no live node of the scheduler could take its sequences; a kept one leaves once one could, or once it failed
    an attend or died. ``placed_on`` is read only when some node is neither alive nor retired (not every step)."""
    if all(node.is_alive or node.is_retired for node in nodes):
        return []
    has_live_other = any(nodes[i].is_alive for i in in_scheduler)
    num_held = Counter(placed_on)
    leaving = []
    for index, node in enumerate(nodes):
        if node.is_alive or node.is_retired:
            continue
        if node.can_be_kept and not has_live_other:
            if not node.is_kept:
                log.warning("KV node %d (%s) is draining and no other node can take its %d sequence(s): it keeps "
                            "serving them, and takes no new one, until they finish or it stops", index,
                            node.node_id, num_held[index])
                node.is_kept = True
            continue
        node.is_kept = False
        node.is_retired = True
        log.warning("KV node %d (%s) leaves: %s; %d sequence(s) to rebuild elsewhere", index, node.node_id,
                    node.failure, num_held[index])
        leaving.append(index)
    return leaving


def no_live_node_error(nodes: Sequence[GuardedNode]) -> UnavailableError:
    """Why a new request is refused while no node is alive: the nodes left drain (kept serving what they hold), or
    none answers."""
    if any(node.is_kept for node in nodes):
        return KVNodesDrainingError("the KV nodes left are draining (their shard daemons are stopping) and take no "
                                    "new sequence; retry when another returns")
    return UnavailableError("no KV node is reachable; retry when one returns")
