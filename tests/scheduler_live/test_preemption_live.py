"""Preemption on a live cluster: one KVShard too small for every sequence at once.

Twelve greedy requests whose KV at their final lengths is well over the
shard's pool; the scheduler overcommits (``overcommit=2``, or each sequence
reserves only 16 tokens ahead of its length), so the pool fills while they
grow and the youngest are preempted, requeued and rebuilt. Every request must
still give exactly its solo tokens.
"""
from __future__ import annotations

import asyncio
import logging
import random

import pytest

from executor_helpers import collect, reference_greedy
from fastdecode.actors.request import SamplingParams
from fastdecode.scheduler import SchedulerConfig
from greedy_compare import assert_same_greedy
from live_cluster import uneven_cluster

KV_MEMORY_BYTES = 1 << 20  # random:tiny float32: 512 B per token over both layers -> 2,048 tokens
NUM_REQUESTS = 12


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [
    SchedulerConfig(max_num_seqs=NUM_REQUESTS, admission="all-at-once", overcommit=2.0),
    # the default overcommit, each sequence reserving 16 tokens ahead of its length: the pool fills as they grow
    SchedulerConfig(max_num_seqs=NUM_REQUESTS, admission="all-at-once", max_reserved_output=16),
], ids=["overcommit", "reserved-output"])
async def test_every_request_completes_with_its_solo_tokens_after_preemptions(tiny_model, one_torch_thread, caplog,
                                                                              scheduler):
    model, _ = tiny_model
    rng = random.Random(5)
    requests = [
        ([rng.randrange(3, model.config.vocab_size) for _ in range(rng.randrange(60, 100))],
         SamplingParams(max_tokens=rng.randrange(160, 200), temperature=0.0, ignore_eos=True))
        for _ in range(NUM_REQUESTS)
    ]
    final_tokens = sum(len(p) + params.max_tokens for p, params in requests)
    assert final_tokens * 512 > 1.5 * KV_MEMORY_BYTES  # far more than fits at once
    caplog.set_level(logging.INFO, logger="fastdecode.executor")
    async with uneven_cluster((0.0,), kv_memory_bytes=KV_MEMORY_BYTES, scheduler=scheduler) as cluster:
        outputs = await asyncio.gather(*(collect(cluster.submit(p, params)) for p, params in requests))
        assert all(used == 0 for used in await cluster.kv_used_bytes())
    preemptions = [r for r in caplog.records if "preempting sequence" in r.getMessage()]
    print(f"{len(preemptions)} preemptions")
    assert preemptions, "the pool never filled: no preemption happened"
    for (prompt, params), (tokens, reason) in zip(requests, outputs):
        assert reason == "length" and len(tokens) == params.max_tokens
        reference, gaps = reference_greedy(model, prompt, params.max_tokens)
        assert_same_greedy(tokens, reference, gaps, label=f"prompt of {len(prompt)}")
