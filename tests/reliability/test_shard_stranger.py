"""A shard daemon serves one Executor's session: another socket's KV requests are refused, whatever they name.

Before, a stranger's ``Free(0..999)`` sent to a live daemon freed every sequence of the Executor there, which
then rebuilt them (a 5 s stall). The Executor's own two connections (its requests and its attend link) keep
being served: the requests complete with their solo tokens and nothing is recovered.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.shard_daemons import shard_daemons
from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.errors import RemoteRequestError
from fastdecode.transport.shard_messages import SHARD_CHANNEL, Allocate, Free, GetStats
from greedy_compare import assert_same_greedy
from reliability_helpers import reference_greedy

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu")


@pytest.mark.slow
async def test_a_strangers_free_on_a_daemon_is_refused_and_the_executor_loses_nothing(tiny_model):
    model, _ = tiny_model
    rng = random.Random(3)
    requests = [([rng.randrange(3, model.config.vocab_size) for _ in range(rng.randrange(4, 24))],
                 SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)) for _ in range(4)]
    with shard_daemons(1, kv_memory="32MiB", extra_args=("--no-calibrate",)) as daemons:
        config = ClusterConfig(**TINY, shard_addresses=(daemons[0].address,))
        async with await Cluster.start(config) as cluster:
            streams = [cluster.submit(p, s) for p, s in requests]
            tokens: list[list[int]] = [[] for _ in streams]
            started = asyncio.Event()

            async def read(i, stream):
                async for event in stream:
                    if event.token_id >= 0:
                        tokens[i].append(event.token_id)
                    if all(len(t) >= 5 for t in tokens):
                        started.set()

            readers = asyncio.gather(*(read(i, s) for i, s in enumerate(streams)))
            await asyncio.wait_for(started.wait(), 60)
            stranger = RpcClient(daemons[0].address, Codec(SHARD_CHANNEL), timeout_s=10.0)
            stranger.start()
            try:
                for message in (Free(tuple(range(1000))), Allocate((5000,))):
                    with pytest.raises(RemoteRequestError) as info:
                        await stranger.request(message)
                    assert info.value.code == "not_session_owner"
                assert (await stranger.request(GetStats())).num_sequences > 0  # statistics stay open
            finally:
                await stranger.close()
            await asyncio.wait_for(readers, 120)
            assert cluster.executor.num_recovered == 0
    for (prompt, params), ours in zip(requests, tokens):
        reference, gaps = reference_greedy(model, prompt, params.max_tokens)
        assert_same_greedy(ours, reference, gaps, label=f"prompt of {len(prompt)}")
