"""The Executor's KV nodes over their lives: failed, draining and returning ones, at step boundaries.

``NodeBook`` holds the guarded nodes (the list the decode step reads too), their reconnects and what a
lost epoch of a node may still hold. At each step boundary (``follow``) it notices what the heartbeats
told, retires failed nodes and drained ones (or keeps a draining one serving when no other node could
take its sequences: ``node_drain``), takes back nodes that returned as a new epoch, and keeps the
scheduler's node set in step; sequences that must leave a node go back to the Executor (``requeue``),
which rebuilds them elsewhere. KV of a dead node is remembered and freed if the same shard returns; an
older epoch's KV is never sent to a newer one.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from fastdecode.actors.guarded_node import GuardedNode, NodeFailedError, NodeState, free_leftovers
from fastdecode.actors.kv_nodes import KVNode, node_model
from fastdecode.actors.node_drain import retire_nodes
from fastdecode.actors.recovery import Backoff, NodeFactory, Reconnector, reopen
from fastdecode.scheduler import Scheduler

log = logging.getLogger("fastdecode.executor")


class NodeBook:
    def __init__(self, nodes: list[KVNode], factories: list[NodeFactory | None], *, backoff: Backoff,
                 on_ready: Callable[[], None], num_layers: int, kv_bytes_per_token: int) -> None:
        self.nodes: list[GuardedNode] = [GuardedNode(node, epoch=1) for node in nodes]
        self._reconnector = Reconnector(factories, on_ready=on_ready, backoff=backoff)
        self._orphans: dict[int, set[int]] = {}  # node index -> sequences a lost epoch of it may still hold
        self._num_layers = num_layers
        self._kv_bytes_per_token = kv_bytes_per_token

    async def release(self, placed: Sequence[tuple[int, int, int] | None]) -> None:
        """Free sequences' KV, each ``(seq id, node index, epoch)`` on the node it was placed on in that epoch (nothing
        on a newer epoch; None: one that holds none), with one Free per node, the nodes at once; remembered as
        orphans of a node that is dead now."""
        by_node: dict[int, list[int]] = {}
        for seq_id, node_index, epoch in filter(None, placed):
            if self.nodes[node_index].epoch == epoch:
                by_node.setdefault(node_index, []).append(seq_id)

        async def free(node_index: int, seq_ids: list[int]) -> None:
            try:
                await free_leftovers(self.nodes[node_index], seq_ids)  # a prompt refused half-way may have left nothing
            except NodeFailedError:
                self._orphans.setdefault(node_index, set()).update(seq_ids)

        await asyncio.gather(*(free(index, seq_ids) for index, seq_ids in by_node.items()))

    async def release_within(self, placed: Sequence[tuple[int, int, int] | None], timeout_s: float) -> None:
        """``release``, given up after ``timeout_s`` and never raising (at shutdown): a node that is gone keeps them
        until its session lapses, as after a crash."""
        try:
            await asyncio.wait_for(self.release(placed), timeout_s)
        except Exception as exc:
            log.warning("freeing %d sequence(s) failed: %s", sum(p is not None for p in placed), exc)

    async def follow(self, scheduler: Scheduler, placed_on: Iterable[int | None],
                     requeue: Callable[[list[int]], Awaitable[None]]) -> list[int]:
        """At a step boundary: find draining nodes, retire failed ones (or keep a draining one serving), take back
        returned ones, keep the scheduler in step. ``placed_on``: the node index of each live sequence (None: not
        placed); ``requeue(seq_ids)``: the sequences the scheduler took off a node, to rebuild elsewhere. Returns the
        waiting sequences no node could hold any more (``Scheduler.stranded``) where a node left or came back."""
        models = dict(scheduler.nodes)
        for node in self.nodes:
            node.refresh()
        retired = retire_nodes(self.nodes, scheduler, placed_on)
        for index in retired:
            self._reconnector.watch(index)
            if self.nodes[index].state is NodeState.DEAD:
                await self.nodes[index].close()  # stop its heartbeats; the reconnect makes a new client
        for index, fresh in self._reconnector.take_ready():
            await self._restore(scheduler, index, fresh, requeue)
        for index in sorted(scheduler.nodes):
            if self.nodes[index].is_kept:
                scheduler.close_node(index)  # it serves what it holds; admissions go elsewhere or wait
            if not self.nodes[index].can_attend and len(scheduler.nodes) > 1:
                await requeue([preemption.seq_id for preemption in scheduler.remove_node(index)])
        for index in retired:  # a drained node, its sequences freed above: its daemon stops, so its client goes
            if self.nodes[index].state is NodeState.DRAINING and index not in scheduler.nodes:
                await self.nodes[index].close()
        after = scheduler.nodes
        is_gone_or_replaced = any(after.get(index) is not model for index, model in models.items())
        return scheduler.stranded() if is_gone_or_replaced else []

    async def _restore(self, scheduler: Scheduler, index: int, fresh: KVNode,
                       requeue: Callable[[list[int]], Awaitable[None]]) -> None:
        """Node ``index`` came back: a new epoch; free what an older epoch may have left; schedule on it again."""
        old = self.nodes[index]
        stats = await reopen(index, fresh, sorted(self._orphans.get(index, set())))
        if stats is None:  # it failed again at once: keep trying
            self._reconnector.watch(index)
            return
        self._orphans.pop(index, None)
        node = GuardedNode(fresh, epoch=old.epoch + 1)
        self.nodes[index] = node
        if old.state is NodeState.DRAINING:
            await old.close()
        model = node_model(index, stats, num_layers=self._num_layers, kv_bytes_per_token=self._kv_bytes_per_token)
        if index in scheduler.nodes:  # the last node, never removed: closed while it drained, its model old
            await requeue([preemption.seq_id for preemption in scheduler.replace_node(model)])
        else:
            scheduler.add_node(model)
        log.info("KV node %d (%s) is back as epoch %d", index, node.node_id, node.epoch)

    async def close(self) -> None:
        """Stop the reconnects (the nodes themselves are their owner's to close)."""
        await self._reconnector.close()
