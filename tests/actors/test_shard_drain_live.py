"""A draining shard that is the Executor's only node: a live in-process cluster over a daemon's DrainableShard.

With nowhere to move its sequences, the shard keeps serving them (the Executor refuses new requests meanwhile)
until they finish, or until its drain deadline passes: then they end with a clear error and the shard stops.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.executor_config import UnavailableError
from fastdecode.actors.kvshard import KVShard, ShardConfig
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.runtime import ActorServer
from fastdecode.actors.shard_drain import DrainableShard, drain, drainable_server
from fastdecode.actors.executor_config import ExecutorConfig
from fastdecode.scheduler.config import SchedulerConfig
from executor_helpers import collect, reference_greedy
from greedy_compare import assert_same_greedy

pytestmark = pytest.mark.timeout(60)

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu")
PROMPTS = ([5, 6, 7, 8, 9], [11, 3, 40, 2], [100, 101, 102, 103, 104, 105])
# a few ms per step of the tiny model: the heartbeats (every 0.1 s here) tell the drain long before they end
SLOW_S_PER_GB = 20.0


async def _serve_drainable(address: str | None = None) -> tuple[DrainableShard, ActorServer, str]:
    """The daemon's set-up (cli/start_shard.py), served in this process."""
    config = ShardConfig(kv_memory_bytes=16 << 20, num_threads=1, is_calibrating=False,
                         slowdown_s_per_gb=SLOW_S_PER_GB)
    actor = DrainableShard(KVShard(config))
    server = drainable_server(actor, address or f"inproc://fastdecode-drain-{uuid.uuid4().hex[:12]}")
    return actor, server, await server.start()


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_the_last_shard_drains_by_serving_its_sequences_to_their_end(tiny_model) -> None:
    model, _ = tiny_model
    actor, server, address = await _serve_drainable()
    num_tokens = 240
    try:
        config = ClusterConfig(**TINY, shard_addresses=(address,), heartbeat_interval_s=0.1)
        async with await Cluster.start(config) as cluster:
            params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
            streams = [cluster.submit(prompt, params) for prompt in PROMPTS]
            first = await asyncio.gather(*(anext(s) for s in streams))
            draining = asyncio.create_task(drain(actor, timeout_s=30.0, hurry=asyncio.Event()))
            node = cluster.executor.nodes[0]
            await _until(lambda: node.is_kept)  # the Executor saw the drain and keeps the node serving
            with pytest.raises(UnavailableError) as info:
                cluster.submit([3, 4, 5], params)  # no new work while its only node drains
            assert info.value.code == "draining" and "draining" in str(info.value)  # not "unreachable"
            rest = await asyncio.gather(*(collect(s) for s in streams))
            num_left = await asyncio.wait_for(draining, 10.0)
    finally:
        await server.stop()
    assert num_left == 0
    for prompt, head, (tokens, reason) in zip(PROMPTS, first, rest):
        tokens = [head.token_id, *tokens]
        assert reason == "length" and len(tokens) == num_tokens
        ref_tokens, gaps = reference_greedy(model, prompt, num_tokens)
        assert_same_greedy(tokens, ref_tokens, gaps, label="drained last shard", min_compared=8)


async def test_at_the_drain_deadline_the_sequences_fail_clearly_and_the_shard_stops() -> None:
    actor, server, address = await _serve_drainable()
    timeout_s = 0.8
    try:
        config = ClusterConfig(**TINY, shard_addresses=(address,), heartbeat_interval_s=0.1)
        async with await Cluster.start(config) as cluster:
            params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
            streams = [cluster.submit(prompt, params) for prompt in PROMPTS]
            await asyncio.gather(*(anext(s) for s in streams))
            start = time.monotonic()
            draining = asyncio.create_task(drain(actor, timeout_s=timeout_s, hurry=asyncio.Event()))
            ends = await asyncio.gather(*(_last_event_and_count(s) for s in streams))
            await asyncio.wait_for(draining, 5.0)
            stopped_after_s = time.monotonic() - start
            await server.stop()  # what the daemon does once drain() returns
    finally:
        await server.stop()
    assert timeout_s <= stopped_after_s < timeout_s + 2.0
    for event, num_tokens in ends:
        assert event.finish_reason == "error" and event.is_retryable
        assert "no KV node is left" in event.error and "drain deadline" in event.error, event.error
        assert num_tokens > 20  # served during the drain, not failed at its start


async def _last_event_and_count(stream):
    num_tokens, event = 0, None
    async for event in stream:
        num_tokens += event.token_id >= 0
    return event, num_tokens


async def test_a_queued_request_behind_a_draining_last_shard_ends_and_its_restart_serves_again(tiny_model) -> None:
    """A rolling restart of the only shard with a request queued behind the batch limit: while the shard drains the
    queued request cannot be placed, and the Executor must keep its loop (heartbeats, the drain, the other streams)
    running rather than spin on it; once the shard has stopped the request ends with a retryable error, and the shard
    restarted at the same address takes new requests (it used to stay closed to admissions for good)."""
    model, _ = tiny_model
    actor, server, address = await _serve_drainable()
    restarted = None
    try:
        config = ClusterConfig(**TINY, shard_addresses=(address,), heartbeat_interval_s=0.1,
                               executor=ExecutorConfig(scheduler=SchedulerConfig(max_num_seqs=2)))
        async with await Cluster.start(config) as cluster:
            params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
            streams = [cluster.submit(prompt, params) for prompt in PROMPTS]  # the third waits for a place
            await asyncio.gather(*(anext(s) for s in streams[:2]))
            draining = asyncio.create_task(drain(actor, timeout_s=30.0, hurry=asyncio.Event(), idle_s=0.3))
            ran = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams[:2])), 20.0)
            assert [reason for _, reason in ran] == ["length", "length"]
            assert await asyncio.wait_for(draining, 10.0) == 0
            await server.stop()  # what the daemon does once drain() returns
            queued = await asyncio.wait_for(_last_event_and_count(streams[2]), 10.0)
            assert queued[0].finish_reason == "error" and queued[0].is_retryable, queued[0]
            restarted, restarted_server, _ = await _serve_drainable(address)  # systemd starts it again
            await _until(lambda: cluster.executor.has_live_node)
            tokens, reason = await asyncio.wait_for(collect(cluster.submit(PROMPTS[2], params)), 20.0)
    finally:
        await server.stop()
        if restarted is not None:
            await restarted_server.stop()
    assert reason == "length" and len(tokens) == 60
    ref_tokens, gaps = reference_greedy(model, PROMPTS[2], 60)
    assert_same_greedy(tokens, ref_tokens, gaps, label="restarted shard", min_compared=8)
