"""A node's time model fed noisy live attend calls, and placement after it.

The pattern recorded on two equal shards (0.09 GB/s, 2-core VM): each step the node serves two
mini-batches' calls per layer, their times scattered by a millisecond of message handling, and
before the decode step stamped only a node's oldest call, often the second call of a pair read
about 0.01 ms whatever its bytes. The unbounded refit then ran to 1000x the calibrated bandwidth
(a flat prediction) and placement sent a whole burst to that node.
"""
from __future__ import annotations

import random

import pytest

from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import ShardPerfModel
from fastdecode.scheduler.placement import NodeLoad, choose_node

CALIBRATED_BW = 0.09e9
CALIBRATED_OVERHEAD_S = 1.3e-4
LIVE_OVERHEAD_S = 1e-3  # message handling on a busy host, on top of the bare call
KV_PER_TOKEN = 1024  # 2 layers x 512 B
LAYERS = 2


def noisy_calls(bandwidth, num_steps=300, seed=0):
    """(kv_bytes, seconds) as the Executor measured them: two mini-batches whose contexts grow, 2 layers,
    each time scattered by +-30%, and a third of the second calls read as 0.01 ms."""
    rng = random.Random(seed)
    calls = []
    for step in range(num_steps):
        sizes = (30e3 + 500 * step + rng.uniform(0, 20e3), 60e3 + 700 * step + rng.uniform(0, 20e3))
        for _ in range(LAYERS):
            for i, size in enumerate(sizes):
                seconds = (LIVE_OVERHEAD_S + size / bandwidth) * rng.uniform(0.7, 1.3)
                calls.append((size, 1e-5 if i == 1 and rng.random() < 1 / 3 else seconds))
    return calls


def test_noisy_calls_keep_the_bandwidth_in_its_band_and_predictions_growing_with_bytes():
    model = ShardPerfModel(CALIBRATED_OVERHEAD_S, CALIBRATED_BW)  # as actors/kv_nodes.node_model builds it
    for kv_bytes, seconds in noisy_calls(CALIBRATED_BW):
        model.observe(kv_bytes, seconds)
        assert CALIBRATED_BW / 16 <= model.bandwidth_bytes_per_s <= 2 * CALIBRATED_BW
        # 4x the bytes costs at least what half the calibrated bandwidth says
        assert model.predict(4 * kv_bytes) - model.predict(kv_bytes) >= 0.999 * 3 * kv_bytes / (2 * CALIBRATED_BW)


def test_flat_noisy_traffic_keeps_the_calibrated_bandwidth_and_learns_the_overhead():
    rng = random.Random(2)
    model = ShardPerfModel(CALIBRATED_OVERHEAD_S, CALIBRATED_BW)
    for _ in range(400):
        model.observe(100e3, (LIVE_OVERHEAD_S + 100e3 / CALIBRATED_BW) * rng.uniform(0.9, 1.1))
    assert model.bandwidth_bytes_per_s == pytest.approx(CALIBRATED_BW, rel=0.02)
    assert model.overhead_s == pytest.approx(LIVE_OVERHEAD_S, rel=0.15)


def make_node(node_id, bandwidth):
    return NodeModel(node_id=node_id, capacity_bytes=10**6 * KV_PER_TOKEN, kv_bytes_per_token=KV_PER_TOKEN,
                     num_layers=LAYERS, page_size=32, perf=ShardPerfModel(CALIBRATED_OVERHEAD_S, bandwidth))


def test_a_burst_after_noisy_observations_splits_by_speed():
    # node 1 is 3x slower; both learnt from noisy calls (with their own speed), then 8 requests arrive at once
    nodes = [make_node(0, 3 * CALIBRATED_BW), make_node(1, CALIBRATED_BW)]
    for node in nodes:
        for kv_bytes, seconds in noisy_calls(node.perf.bandwidth_bytes_per_s, num_steps=120, seed=node.node_id):
            node.perf.observe(kv_bytes, seconds)
    loads = {node.node_id: NodeLoad(node) for node in nodes}
    placed = []
    for prompt in (400, 650, 300, 800, 500, 700, 350, 600):
        node_id = choose_node(loads.values(), prompt, prompt + 200)
        load = loads[node_id]
        loads[node_id] = NodeLoad(load.node, load.num_used_pages + load.node.pages_for(prompt + 1),
                                  load.num_committed_pages + load.node.pages_for(prompt + 200),
                                  load.num_final_tokens + prompt + 200)
        placed.append(node_id)
    assert 4 <= placed.count(0) <= 7, placed  # the fast node takes most, the slow one some
