"""Placement on a live cluster: two KVShards of different measured speeds (one slowed on purpose).

The slow shard sleeps ``SLOWDOWN_S_PER_GB`` per GB of KV it reads, in its
start-up calibration as in every attend, so the scheduler's node models (the
calibration, then the attend round trips the Executor measures) see it slower.
The faster shard must receive more of the 24 requests, and greedy outputs must
equal the single-process reference.  (On random:tiny a call reads little KV, so
the Executor's per-row Python cost also grows with the bytes read and looks like
bandwidth in the round trips; the slowdown is set well above it.)
"""
from __future__ import annotations

import asyncio
import random

import pytest

from executor_helpers import collect, reference_greedy
from fastdecode.actors.request import SamplingParams
from fastdecode.scheduler import SchedulerConfig
from greedy_compare import assert_same_greedy
from live_cluster import record_placements, uneven_cluster

SLOWDOWN_S_PER_GB = 48.0  # about 20 MB/s: a few ms per attend call of a few of these sequences
NUM_REQUESTS = 24


def make_requests(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(11)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randrange(8, 64))],
         SamplingParams(max_tokens=rng.randrange(12, 40), temperature=0.0, ignore_eos=True))
        for _ in range(NUM_REQUESTS)
    ]


@pytest.mark.slow
async def test_faster_shard_receives_more_sequences_and_outputs_are_unchanged(tiny_model, one_torch_thread):
    model, _ = tiny_model
    requests = make_requests(model.config.vocab_size)
    scheduler = SchedulerConfig(max_num_seqs=16, admission="sls", sls_min_group_size=2)
    async with uneven_cluster((0.0, SLOWDOWN_S_PER_GB), scheduler=scheduler) as cluster:
        perf = {i: n.perf for i, n in cluster.executor.scheduler.nodes.items()}
        calibrated_gbps = [perf[i].bandwidth_bytes_per_s / 1e9 for i in (0, 1)]
        placements = record_placements(cluster)
        outputs = await asyncio.gather(*(collect(cluster.submit(p, params)) for p, params in requests))
        observed = [perf[i].errors.num_observations for i in (0, 1)]
        assert all(used == 0 for used in await cluster.kv_used_bytes())
    on_node = [placements.count(i) for i in (0, 1)]
    print(f"calibrated GB/s {calibrated_gbps}, sequences per shard {on_node}, attend calls measured {observed}")
    assert calibrated_gbps[0] > 4 * calibrated_gbps[1]  # the slowdown shows in the calibration
    assert sum(on_node) == NUM_REQUESTS
    assert on_node[0] > on_node[1]  # the fast shard gets more
    assert observed[0] > 0
    for (prompt, params), (tokens, reason) in zip(requests, outputs):
        assert reason == "length" and len(tokens) == params.max_tokens
        reference, gaps = reference_greedy(model, prompt, params.max_tokens)
        assert_same_greedy(tokens, reference, gaps, label=f"prompt of {len(prompt)}")
