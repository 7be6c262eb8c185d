"""Shared pieces of the reliability tests: reference greedy runs, stream collection, a killable KV node."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastdecode.actors.kv_nodes import KVNode, LocalKVNode, NodeStats
from fastdecode.transport.errors import PeerDeadError, RemoteRequestError

_spec = importlib.util.spec_from_file_location(
    "reliability_executor_helpers", Path(__file__).resolve().parents[1] / "actors" / "executor_helpers.py")
_executor_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_executor_helpers)
reference_greedy = _executor_helpers.reference_greedy
collect = _executor_helpers.collect


class KillableNode(KVNode):
    """A local KV node that can die (PeerDeadError, optionally at its n-th attend) or drain
    (``draining`` error replies), like a shard daemon seen through its client."""

    is_host = False

    def __init__(self, inner: LocalKVNode, name: str) -> None:
        self.inner = inner
        self.node_id = name
        self.is_dead = False
        self.is_draining = False
        self.die_at_attend: int | None = None
        self.refuse_at_attend: int | None = None  # that attend's reply is pool_full (its k, v are appended)
        self.fault_at_attend: int | None = None  # that attend's reply is an internal error (a handler failed)
        self._is_refusing = False
        self.num_attends = 0
        self.num_freed = 0

    def _check(self, *, is_draining_ok: bool = False) -> None:
        if self.is_dead:
            raise PeerDeadError(f"{self.node_id} silent")
        if self.is_draining and not is_draining_ok:
            raise RemoteRequestError("draining", f"{self.node_id} is shutting down")

    async def allocate(self, seq_ids):
        self._check()
        await self.inner.allocate(seq_ids)

    async def free(self, seq_ids):
        self._check(is_draining_ok=True)
        await self.inner.free(seq_ids)
        self.num_freed += len(seq_ids)

    async def append_prompt(self, seq_id, k, v):
        self._check()
        await self.inner.append_prompt(seq_id, k, v)

    async def attend(self, layer, seq_ids, q, k, v):
        return self.end_attend(self.begin_attend(layer, seq_ids, q, k, v))

    def begin_attend(self, layer, seq_ids, q, k, v):
        self._check()
        self.num_attends += 1
        if self.die_at_attend is not None and self.num_attends >= self.die_at_attend:
            self.is_dead = True
            self._check()
        self._is_refusing = self.num_attends == self.refuse_at_attend
        if self.num_attends == self.fault_at_attend:
            raise RemoteRequestError("internal", f"{self.node_id}'s handler failed")
        return self.inner.attend_now(layer, seq_ids, q, k, v)

    def end_attend(self, pending):
        self._check()  # a node that died while its attend was in flight gives no answer
        if self._is_refusing:
            self._is_refusing = False
            raise RemoteRequestError("pool_full", f"{self.node_id} has no free page")
        return pending

    async def stats(self) -> NodeStats:
        self._check(is_draining_ok=True)
        return await self.inner.stats()


class Revivable:
    """A node factory for the Executor: a fresh KillableNode over the same cache once ``is_back``."""

    def __init__(self, inner: LocalKVNode, name: str) -> None:
        self.inner = inner
        self.name = name
        self.is_back = False
        self.num_attempts = 0

    async def __call__(self) -> KillableNode:
        self.num_attempts += 1
        if not self.is_back:
            raise OSError(f"{self.name} is not reachable")
        return KillableNode(self.inner, self.name)
