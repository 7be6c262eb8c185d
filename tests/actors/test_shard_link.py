"""The dense thread's blocking link to a KVShard (transport/link.py): the same answers as the async client,
late replies dropped, error replies raised, a dead peer and a timeout fail the wait and close the link."""
from __future__ import annotations

import asyncio
import time

import ml_dtypes
import numpy as np
import pytest

from fastdecode.actors.shard_client import ShardClient, start_embedded_shard
from fastdecode.transport.link import BlockingLink
from fastdecode.transport.codec import Codec
from fastdecode.transport.errors import PeerDeadError, RemoteRequestError, RequestTimeoutError
from fastdecode.transport.shard_messages import SHARD_CHANNEL, Attend, AttendResult

BF16 = np.dtype(ml_dtypes.bfloat16)
NUM_LAYERS, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 2, 8, 2, 64


def attend_message(rng, layer: int, seq_ids: list[int]) -> Attend:
    def rand(*shape):
        return rng.standard_normal(shape).astype(BF16)

    rows = len(seq_ids)
    return Attend(layer, np.array(seq_ids, dtype=np.int64), rand(rows, NUM_Q_HEADS, HEAD_DIM),
                  rand(rows, NUM_KV_HEADS, HEAD_DIM), rand(rows, NUM_KV_HEADS, HEAD_DIM))


async def two_shards():
    """Two identical in-process shards holding sequences 1 and 2 with the same prompt K/V."""
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((NUM_LAYERS, 5, NUM_KV_HEADS, HEAD_DIM)).astype(BF16)
    shards, clients = [], []
    for _ in range(2):
        address, shard = await start_embedded_shard(threads=1, kv_memory_bytes=8 << 20, is_calibrating=False)
        client = await ShardClient.connect(address)
        await client.configure(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                               kv_dtype="bfloat16")
        await client.allocate([1, 2])
        for seq_id in (1, 2):
            await client.append_prompt(seq_id, prompt, prompt)
        shards.append(shard)
        clients.append(client)
    return shards, clients


async def close_all(shards, clients):
    for client in clients:
        await client.close()
    for shard in shards:
        await shard.stop()


async def test_link_answers_like_the_async_client_and_drops_late_replies():
    shards, (by_client, by_link) = await two_shards()
    try:
        rng = np.random.default_rng(1)
        messages = [attend_message(rng, layer, [1, 2]) for layer in (0, 1, 0)]
        expected = [(await by_client.attend(m.layer, m.seq_ids, m.q, m.k, m.v))[0] for m in messages]
        link = by_link.link

        def on_the_dense_thread():
            first = link.receive(link.send(messages[0]), AttendResult).o
            skipped = link.send(messages[1])  # its reply arrives first and is dropped as late
            second = link.send(messages[2])
            result = link.receive(second, AttendResult).o
            return first, result, skipped

        first, third, _ = await asyncio.to_thread(on_the_dense_thread)
        np.testing.assert_array_equal(first, expected[0])
        # the dropped request still ran on the shard (layer 1), so the third call equals the client's third
        np.testing.assert_array_equal(third, expected[2])
        assert not link.has_reply()
    finally:
        await close_all(shards, (by_client, by_link))


async def test_link_raises_error_replies():
    shards, clients = await two_shards()
    try:
        link = clients[0].link
        bad = attend_message(np.random.default_rng(2), 0, [7])  # no such sequence

        def call():
            return link.receive(link.send(bad), AttendResult)

        with pytest.raises(RemoteRequestError) as info:
            await asyncio.to_thread(call)
        assert info.value.code == "unknown_sequence"
    finally:
        await close_all(shards, clients)


def test_dead_peer_and_timeout_fail_the_wait_and_close_the_link():
    import zmq

    ctx = zmq.Context()
    codec = Codec(SHARD_CHANNEL)
    message = attend_message(np.random.default_rng(3), 0, [1])
    try:
        alive = [True]
        link = BlockingLink("tcp://127.0.0.1:1", codec, ctx=ctx, timeout_s=0.3, is_alive=lambda: alive[0])
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            link.receive(link.send(message), AttendResult)  # nobody listens: the request waits in the queue
        assert 0.25 < time.monotonic() - start < 2.0
        with pytest.raises(PeerDeadError, match="closed"):
            link.send(message)
        alive[0] = False
        dead = BlockingLink("tcp://127.0.0.1:1", codec, ctx=ctx, timeout_s=30, is_alive=lambda: alive[0])
        with pytest.raises(PeerDeadError, match="dead"):
            dead.send(message)
    finally:
        ctx.destroy(linger=0)


async def test_a_stuck_worker_fails_the_attend_at_its_timeout_though_its_heartbeats_go_on():
    """Heartbeats are answered off the shard's worker: a worker stuck in a call (here: slowed to 2 s an attend) looks alive.
    The attend's own timeout finds it, on the link and on the async client, well before the 60 s of other calls."""
    address, shard = await start_embedded_shard(threads=1, kv_memory_bytes=8 << 20, is_calibrating=False,
                                                slowdown_s_per_gb=1000.0)
    client = await ShardClient.connect(address, heartbeat_interval_s=0.1, attend_timeout_s=0.5)
    try:
        await client.configure(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                               kv_dtype="bfloat16")
        rng = np.random.default_rng(4)
        prompt = rng.standard_normal((NUM_LAYERS, 4096, NUM_KV_HEADS, HEAD_DIM)).astype(BF16)  # 2 MB a layer: 2 s
        await client.allocate([1])
        await client.append_prompt(1, prompt, prompt)
        message = attend_message(rng, 0, [1])
        link = client.link
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await asyncio.to_thread(lambda: link.receive(link.send(message), AttendResult))
        assert time.monotonic() - start < 1.5
        assert client.is_alive  # its heartbeats went on all along
        with pytest.raises(RequestTimeoutError):
            await client.attend(1, message.seq_ids, message.q, message.k, message.v)
        assert time.monotonic() - start < 3.0
    finally:
        await client.close()
        await shard.stop()


async def test_an_in_process_shard_keeps_the_clients_timeout_for_its_attends():
    """An in-process shard may answer on this process's event loop: a handler holding the loop for 10 s must not fail
    the only node, so its attends keep the client's timeout; a daemon's get the cluster's attend_timeout_s."""
    from fastdecode.actors.cluster import ClusterConfig
    from fastdecode.actors.shard_links import ShardLinks

    shape = dict(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype="bfloat16")
    links = ShardLinks.open(ClusterConfig(attend_timeout_s=2.5), shape=shape)
    address, shard = await start_embedded_shard(threads=1, kv_memory_bytes=8 << 20, is_calibrating=False)
    node = await links.connect(address)
    try:
        assert node.client.attend_timeout_s == 60.0
    finally:
        await node.close()
        await shard.stop()
    assert links.attend_timeout_s == 2.5
