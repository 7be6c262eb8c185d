"""hybrid vs gpu-only: the start-up choice from the calibrated models."""
from __future__ import annotations

import pytest

from fastdecode.scheduler import GpuPerfModel, NodeModel, ShardPerfModel
from fastdecode.scheduler.hybrid import choose_mode, gpu_only_batch

LAYERS, TOKEN_BYTES = 32, 128 << 10  # Llama-3-8B bf16


def node(node_id: int, capacity_tokens: int, gbps: float, overhead_s: float = 50e-6, page: int = 16) -> NodeModel:
    return NodeModel(node_id, capacity_tokens * TOKEN_BYTES, TOKEN_BYTES, LAYERS, page,
                     ShardPerfModel(overhead_s, gbps * 1e9))


DENSE = GpuPerfModel([(1, 5e-3), (64, 6e-3), (256, 12e-3)])


def test_gpu_only_when_the_gpu_holds_the_batch_and_shards_are_slow():
    choice = choose_mode(DENSE, node(0, 64 * 640, 2000.0, page=640), [node(1, 10**6, 20.0)],
                         batch=64, mean_context=576, final_len=640)
    assert choice.mode == "gpu-only"
    assert choice.gpu_only_batch == 64
    assert choice.gpu_only_tokens_per_s >= choice.hybrid_tokens_per_s / 1.03


def test_hybrid_when_gpu_memory_limits_the_batch():
    # the GPU holds 8 sequences; fast shards take the rest of a batch of 256
    choice = choose_mode(DENSE, node(0, 8 * 640, 2000.0, page=640), [node(i, 10**6, 200.0) for i in (1, 2, 3, 4)],
                         batch=256, mean_context=576, final_len=640)
    assert choice.mode == "hybrid"
    assert choice.gpu_only_batch == 8
    assert choice.hybrid_tokens_per_s > 1.03 * choice.gpu_only_tokens_per_s
    assert 0 <= choice.hybrid_gpu_sequences <= 8


def test_no_shard_room_means_no_hybrid_split():
    choice = choose_mode(DENSE, node(0, 8 * 640, 2000.0, page=640), [node(1, 0, 200.0)],
                         batch=64, mean_context=576, final_len=640)
    assert choice.mode == "gpu-only" and choice.hybrid_tokens_per_s == 0.0


def test_bad_plan_is_refused():
    with pytest.raises(ValueError):
        choose_mode(DENSE, node(0, 640, 2000.0), [], batch=0, mean_context=1, final_len=2)


def test_a_measured_gpu_only_step_overrides_the_dense_profile():
    gpu, shards = node(0, 8 * 640, 2000.0, page=640), [node(i, 10**6, 200.0) for i in (1, 2, 3, 4)]
    plan = dict(batch=256, mean_context=576, final_len=640)
    assert gpu_only_batch(gpu, 256, 640) == 8
    estimated = choose_mode(DENSE, gpu, shards, **plan)
    # the GPU's real step (one graph replay) is so fast that the shards no longer pay
    fast = 8 / (2 * estimated.hybrid_tokens_per_s)
    measured = choose_mode(DENSE, gpu, shards, **plan, measured_gpu_only_step_s=fast)
    assert estimated.mode == "hybrid" and measured.mode == "gpu-only"
    assert measured.gpu_only_step_s == fast
    assert measured.hybrid_tokens_per_s == estimated.hybrid_tokens_per_s


def test_prefills_shrink_a_small_decode_gain_below_the_margin():
    gpu, shards = node(0, 8 * 640, 2000.0, page=640), [node(i, 10**6, 200.0) for i in (1, 2, 3, 4)]
    plan = dict(batch=256, mean_context=576, final_len=640)  # 128 output tokens per sequence
    hybrid_step = choose_mode(DENSE, gpu, shards, **plan).hybrid_step_s
    only_step = 1.06 * 8 * hybrid_step / 256  # hybrid decodes 6% faster than gpu-only
    decode_only = choose_mode(DENSE, gpu, shards, **plan, measured_gpu_only_step_s=only_step)
    assert decode_only.mode == "hybrid" and decode_only.prefill_s == 0.0
    assert decode_only.hybrid_tokens_per_s / decode_only.gpu_only_tokens_per_s == pytest.approx(1.06)
    prefill = 128 * only_step / 8  # a prefill as long as a sequence's share of its 128 decode steps
    with_prefill = choose_mode(DENSE, gpu, shards, **plan, measured_gpu_only_step_s=only_step, prefill_s=prefill)
    assert with_prefill.mode == "gpu-only" and with_prefill.prefill_s == prefill
    assert with_prefill.gpu_only_tokens_per_s == pytest.approx(8 * 128 / (8 * prefill + 128 * only_step))
    assert 1 < with_prefill.hybrid_tokens_per_s / with_prefill.gpu_only_tokens_per_s < 1.03
    with pytest.raises(ValueError):
        choose_mode(DENSE, gpu, shards, **plan, prefill_s=-1.0)


def test_planned_lengths_from_a_mean_context():
    from fastdecode.scheduler.hybrid import planned_lengths

    assert planned_lengths(512 + 32 / 2, 544) == (512, 32)  # bench offline: prompt 512, output 32
    assert planned_lengths(1, 2) == (1, 1)  # at least one token each
