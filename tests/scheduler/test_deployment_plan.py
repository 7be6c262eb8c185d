import json

import pytest

from fastdecode.scheduler.gpu_profile import GPU_SPECS, GpuProfile, GpuSpec
from fastdecode.scheduler.model_shape import LLAMA3_8B, LLAMA3_70B, ModelShape
from fastdecode.scheduler.plan import PlanError, PlanRequest, plan_deployment

GIB = 1 << 30


def plan_on(shape, gpu, **kwargs):
    spec = GPU_SPECS[gpu]
    request = PlanRequest(**{"prompt_len": 128, "output_len": 1024, **kwargs})
    return plan_deployment(shape, lambda b: spec.dense_step_s(shape, b), request, spec.memory_bytes)


def test_llama3_shapes_match_the_published_sizes():
    assert LLAMA3_8B.num_params == pytest.approx(8.03e9, rel=0.01)
    assert LLAMA3_70B.num_params == pytest.approx(70.55e9, rel=0.01)
    assert LLAMA3_8B.kv_bytes_per_token == 128 * 1024
    assert LLAMA3_70B.kv_bytes_per_token == 320 * 1024
    assert LLAMA3_8B.wire_bytes_per_token_layer == (2 * 32 + 2 * 8) * 128 * 2  # 20 KiB, as DESIGN.md says
    assert LLAMA3_8B.dense_params == LLAMA3_8B.num_params - 128256 * 4096


def test_analytic_gpu_is_weight_bound_then_compute_bound():
    h100 = GPU_SPECS["h100"]
    small, knee = h100.dense_step_s(LLAMA3_8B, 1), h100.dense_step_s(LLAMA3_8B, 64)
    assert small == pytest.approx(LLAMA3_8B.dense_weight_bytes / (3.35e12 * 0.85) + 32 * 20e-6)
    assert knee == small  # still reading weights
    big = h100.dense_step_s(LLAMA3_8B, 4096)
    assert big == pytest.approx(2 * LLAMA3_8B.dense_params * 4096 / (989e12 * 0.6) + 32 * 20e-6)
    assert h100.dense_step_s(LLAMA3_8B, 0) == 0.0


def test_70b_on_h200_the_batch_is_justified_by_host_memory_and_balance():
    result = plan_on(LLAMA3_70B, "h200")
    # The weights nearly fill the GPU: on its own it would hold the KV of only a few sequences.
    assert result.weights_gib == pytest.approx(131.4, abs=0.5)
    assert 0 < result.gpu_only_max_batch < 40
    # With the KV on hosts the batch is an order of magnitude larger...
    assert result.batch_size >= 10 * result.gpu_only_max_batch
    # ...past the GPU's compute knee (mini-batch ~ FLOP/s / HBM bytes/s ~ 146), not far beyond it
    spec = GPU_SPECS["h200"]
    knee = (spec.peak_flops * spec.flops_efficiency) / (spec.hbm_bytes_per_s * spec.hbm_efficiency)
    assert 0.8 * knee <= result.batch_size / 2 <= 1.5 * knee
    # ...and the shards keep up: attention per layer fits within the dense time per layer.
    assert result.bound == "gpu" and result.shard_ms_per_layer <= result.gpu_ms_per_layer
    half = result.batch_size // 2
    wire_s = half * LLAMA3_70B.wire_bytes_per_token_layer / 50e9
    read = half * 640 * LLAMA3_70B.kv_read_bytes_per_token_layer
    t_gpu = result.gpu_ms_per_layer / 1e3
    assert 100e-6 + wire_s + read / (result.num_shards * 60e9) <= t_gpu  # enough shards...
    assert 100e-6 + wire_s + read / ((result.num_shards - 1) * 60e9) > t_gpu  # ...and not one more than needed
    # host memory is the batch at full length
    assert result.host_memory_gib == pytest.approx(result.batch_size * 1152 * 320 * 1024 / GIB)
    # latency per token = 2 * layers * per-layer mini-batch time
    assert result.ms_per_token == pytest.approx(2 * 80 * max(result.gpu_ms_per_layer, result.shard_ms_per_layer))
    assert result.tokens_per_s == pytest.approx(result.batch_size / (result.ms_per_token / 1e3))


def test_8b_plans_and_options():
    base = plan_on(LLAMA3_8B, "h100")
    assert base.batch_size % 2 == 0 and base.num_shards >= 1
    # a latency limit shrinks the batch
    tight = plan_on(LLAMA3_8B, "h100", max_latency_s=0.6 * base.ms_per_token / 1e3)
    assert tight.ms_per_token <= 0.6 * base.ms_per_token
    assert tight.batch_size < base.batch_size
    # a fixed pool of two slow shards: shard-bound, both used, faster one first
    pool = plan_on(LLAMA3_8B, "h100", shard_bytes_per_s=(30e9, 60e9))
    assert pool.bound == "shards" and pool.num_shards == 2 and pool.shard_gbps == [60.0, 30.0]
    # shard memory is a constraint when given
    small = plan_on(LLAMA3_8B, "a10", shard_memory_bytes=8 * GIB)
    assert small.num_shards * 8 >= small.host_memory_gib
    with pytest.raises(PlanError, match="latency"):
        plan_on(LLAMA3_8B, "h100", max_latency_s=1e-4)


def test_model_that_does_not_fit_the_gpu_is_refused():
    with pytest.raises(PlanError, match="do not fit"):
        plan_on(LLAMA3_70B, "h100")
    with pytest.raises(ValueError, match="prompt_len"):
        PlanRequest(prompt_len=0, output_len=10)
    with pytest.raises(ValueError, match="bandwidths"):
        PlanRequest(prompt_len=1, output_len=10, shard_bytes_per_s=(0.0,))


def test_measured_profile_round_trips_and_drives_the_plan():
    spec = GPU_SPECS["h100"]
    profile = spec.sweep(LLAMA3_8B, batches=(1, 8, 64, 256, 1024))
    text = json.dumps(profile.to_json_dict())
    parsed = GpuProfile.from_json_dict(json.loads(text))
    assert parsed == profile
    model = parsed.perf_model()
    request = PlanRequest(prompt_len=128, output_len=1024)
    from_profile = plan_deployment(LLAMA3_8B, model.predict, request, parsed.memory_bytes)
    from_spec = plan_deployment(LLAMA3_8B, lambda b: spec.dense_step_s(LLAMA3_8B, b), request, spec.memory_bytes)
    assert from_profile.batch_size == pytest.approx(from_spec.batch_size, rel=0.15)
    assert from_profile.tokens_per_s == pytest.approx(from_spec.tokens_per_s, rel=0.1)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "JSON object"),
        ({"format": "x", "version": 1, "dense_step_s": {"1": 1.0}}, "not a GPU profile"),
        ({"format": "fastdecode.gpu-profile", "version": 2, "dense_step_s": {"1": 1.0}}, "version"),
        ({"format": "fastdecode.gpu-profile", "version": 1}, "non-empty object"),
        ({"format": "fastdecode.gpu-profile", "version": 1, "dense_step_s": {"a": 1.0}}, "batch size"),
        ({"format": "fastdecode.gpu-profile", "version": 1, "dense_step_s": {"1": -1}}, "positive number"),
        ({"format": "fastdecode.gpu-profile", "version": 1, "dense_step_s": {"1": 1e-3}}, "two or more"),
        (
            {"format": "fastdecode.gpu-profile", "version": 1, "dense_step_s": {"1": 1e-3, "2": 1e-3}, "memory_bytes": "8G"},
            "memory_bytes",
        ),
    ],
)
def test_bad_profiles_are_refused_with_a_reason(data, message):
    with pytest.raises(ValueError, match=message):
        GpuProfile.from_json_dict(data)


def test_shape_and_spec_validation():
    with pytest.raises(ValueError, match="multiple"):
        ModelShape.llama(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=3, num_kv_heads=2,
                         vocab_size=100, head_dim=16)
    with pytest.raises(ValueError, match="efficiency"):
        GpuSpec("x", 1e12, 1e14, 1 << 30, hbm_efficiency=1.5)


def test_a_request_past_the_models_context_is_refused():
    assert plan_on(LLAMA3_8B, "h100", prompt_len=1000, output_len=24, max_model_len=1024).batch_size >= 2
    with pytest.raises(PlanError, match=r"prompt 1000 \+ output 25 = 1025 tokens do not fit the model's context "
                                        r"of 1024 tokens"):
        plan_on(LLAMA3_8B, "h100", prompt_len=1000, output_len=25, max_model_len=1024)
    with pytest.raises(ValueError, match="max_model_len must be a positive integer"):
        PlanRequest(prompt_len=1, output_len=1, max_model_len=0)
