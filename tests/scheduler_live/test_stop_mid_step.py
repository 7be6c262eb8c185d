"""Stopping the cluster while a decode step waits on an in-process shard served by the same event loop: the
stop waits for the step off the loop, so the shard can still answer, and it ends in seconds, not at the
link's request timeout."""
from __future__ import annotations

import asyncio
import time

from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.shard_client import start_embedded_shard
from live_cluster import TINY

SLOW_S_PER_GB = 1000.0  # about a millisecond per attend of the tiny model: a step is nearly always in flight


async def test_stop_while_a_step_waits_on_an_in_process_shard(tiny_model):
    address, shard = await start_embedded_shard(threads=1, kv_memory_bytes=16 << 20, is_calibrating=False,
                                                slowdown_s_per_gb=SLOW_S_PER_GB)
    try:
        cluster = await Cluster.start(ClusterConfig(**TINY, shard_addresses=(address,)))
        stream = cluster.submit(list(range(3, 40)), SamplingParams(max_tokens=500, temperature=0.0,
                                                                   ignore_eos=True))
        await anext(stream)  # decoding has started
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await asyncio.wait_for(cluster.stop(), timeout=20)
        assert time.monotonic() - start < 10
        events = [event async for event in stream]
        assert events and events[-1].finish_reason == "error"
    finally:
        await shard.stop()
