"""Live-cluster helpers for the scheduler tests: uneven in-process shards, placement and step records.

The shards are real KVShards served in this process (``start_embedded_shard``),
one of them optionally slowed (``slowdown_s_per_gb``); the cluster reaches them
by address, as it would reach daemons.  ``StepRecorder`` feeds the scheduler's
step model each measured decode step, the way the Executor should (see the
report of issue 6), and keeps (batch, predicted, measured) for the check.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.executor import ExecutorConfig
from fastdecode.actors.shard_client import start_embedded_shard
from fastdecode.scheduler import SchedulerConfig

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu")


@contextlib.asynccontextmanager
async def uneven_cluster(slowdowns_s_per_gb: tuple[float, ...], *, kv_memory_bytes: int = 16 << 20,
                         scheduler: SchedulerConfig | None = None,
                         profile_batches: tuple[int, ...] = ()) -> AsyncIterator[Cluster]:
    """A random:tiny cluster over one in-process shard per slowdown (one attention thread each)."""
    handles = []
    try:
        addresses = []
        for slowdown in slowdowns_s_per_gb:
            address, handle = await start_embedded_shard(threads=1, kv_memory_bytes=kv_memory_bytes,
                                                         slowdown_s_per_gb=slowdown)
            handles.append(handle)
            addresses.append(address)
        executor = ExecutorConfig(scheduler=scheduler or SchedulerConfig(), profile_batches=profile_batches)
        async with await Cluster.start(ClusterConfig(**TINY, shard_addresses=tuple(addresses),
                                                     executor=executor)) as cluster:
            yield cluster
    finally:
        for handle in handles:
            await handle.stop()


def record_placements(cluster: Cluster) -> list[int]:
    """Node ids of every admission the scheduler decides from now on (a test-side tap on ``schedule``)."""
    scheduler = cluster.executor.scheduler
    schedule = scheduler.schedule
    placements: list[int] = []

    def tapped():
        plan = schedule()
        placements.extend(a.node_id for a in plan.admitted)
        return plan

    scheduler.schedule = tapped
    return placements


@dataclass
class StepRecorder:
    """Wraps the Executor's decode step: predicts it and keeps (batch, predicted, measured) for the check.

    The Executor itself feeds the scheduler each measured step (``observe_decode``) and each
    attend call's interval (``observe_attend_calls``, which learns every node's service time).
    """

    cluster: Cluster
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # (batch, predicted s, measured s)

    def install(self) -> "StepRecorder":
        executor = self.cluster.executor
        decoder = executor.decoder
        run = decoder.run

        async def timed(minibatches, *, is_pipelined):
            groups = [[s.seq_id for s in mb.seqs] for mb in minibatches]
            if not is_pipelined:
                groups = [[seq_id for group in groups for seq_id in group]]
            predicted = executor.scheduler.predict_decode_s(groups)
            start = time.perf_counter()
            logits = await run(minibatches, is_pipelined=is_pipelined)
            seconds = time.perf_counter() - start
            self.steps.append((sum(len(g) for g in groups), predicted, seconds))
            return logits

        decoder.run = timed
        return self
