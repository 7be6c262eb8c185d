"""Draining KV nodes as the Executor sees them: finding out, and whether one keeps serving what it holds.

A shard daemon that got SIGTERM (actors/shard_drain.py) refuses new sequences with ``draining`` but still
attends for the ones it holds, until they are gone or its drain deadline passes. The Executor learns of the
drain when one of its allocations is refused, or from ``DrainProbe``: an empty Allocate sent to every live
node at most every ``DRAIN_PROBE_S``, at a step boundary (a draining shard refuses it; any other node
allocates nothing).

At a step boundary (``retire_nodes``) a draining node leaves like a failed one when some other live node
of the scheduler could take its sequences: they are requeued, rebuilt there, and freed on it. With no such
node it is *kept* (``GuardedNode.is_kept``): its sequences go on decoding there, it takes no new one (the
Executor puts an admission to it back in the queue, and refuses new requests while no node is live), and it
leaves as soon as another node is live (one came back) or it fails (its drain deadline passed, or it died).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from fastdecode.actors.guarded_node import GuardedNode, NodeFailedError
from fastdecode.transport.errors import RemoteRequestError

log = logging.getLogger("fastdecode.executor")

DRAIN_PROBE_S = 0.25  # how often the live nodes are asked whether they drain (one empty Allocate each)


class DrainProbe:
    """Asks the live nodes, at most every ``interval_s``, whether they drain; GuardedNode marks those that do."""

    def __init__(self, interval_s: float = DRAIN_PROBE_S) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be at least 0, got {interval_s!r}")
        self.interval_s = interval_s
        self._last_s = float("-inf")

    async def run(self, nodes: Sequence[GuardedNode]) -> None:
        now = time.monotonic()
        if now - self._last_s < self.interval_s:
            return
        self._last_s = now
        await asyncio.gather(*(_probe(node) for node in nodes if node.is_alive))


async def _probe(node: GuardedNode) -> None:
    try:
        await node.allocate([])
    except NodeFailedError as exc:  # GuardedNode marked it DRAINING (or DEAD): the step boundary acts on it
        log.debug("probe of KV node %s: %s", node.node_id, exc)
    except RemoteRequestError as exc:  # an answer that says nothing of a drain: the next call will tell
        log.warning("probe of KV node %s refused: %s", node.node_id, exc)


def retire_nodes(nodes: Sequence[GuardedNode], in_scheduler: Iterable[int],
                 placed_on: Iterable[int | None]) -> list[int]:
    """Mark retired (and log) the failed or draining nodes whose sequences leave now; their indices.
    ``placed_on``: the node index of each live sequence (None: not placed). A draining node is kept instead while
    no live node of the scheduler could take its sequences; a kept one leaves once one could, or once it failed
    an attend or died."""
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
