"""The decode step of a mini-batch held wholly on a node that runs it as one call (the GPU KV node's
CUDA graph): predicted from that node's whole-step model, which learns from measured steps."""
from __future__ import annotations

import pytest

from fastdecode.scheduler import GpuPerfModel, NodeModel, Scheduler, SchedulerConfig, ShardPerfModel
from fastdecode.scheduler.step_model import DecodeStepModel, MiniBatchLoad

LAYERS = 32
KV = 1000 * LAYERS


def gpu_kv_node(whole_step: GpuPerfModel | None) -> NodeModel:
    # attend calls calibrated on the eager attention: 50 us + 100 GB/s per layer
    return NodeModel(0, 10**10, KV, LAYERS, 560, ShardPerfModel(5e-5, 1e11), whole_step=whole_step)


def eager_dense(batch: float) -> float:
    return 0.018  # the eager start-up sweep: per-layer launches make it slower than the graph


def test_a_whole_step_minibatch_is_predicted_by_its_node_not_the_layer_chain():
    graphs = GpuPerfModel([(1, 0.0095), (64, 0.0125)])
    with_graph = DecodeStepModel({0: gpu_kv_node(graphs)}, LAYERS, eager_dense)
    chain_only = DecodeStepModel({0: gpu_kv_node(None)}, LAYERS, eager_dense)
    load = MiniBatchLoad(64, {0: 64 * 528})
    assert with_graph.predict([load]) == pytest.approx(0.0125)
    assert with_graph.predict([MiniBatchLoad(1, {0: 528})]) == pytest.approx(0.0095)
    assert chain_only.predict([load]) > 0.018  # what over-predicted the one-graph step 2-3x


def test_measured_steps_teach_the_whole_step_model_and_not_the_call_overhead():
    graphs = GpuPerfModel([(1, 0.005), (64, 0.008)])
    model = DecodeStepModel({0: gpu_kv_node(graphs)}, LAYERS, eager_dense)
    load = [MiniBatchLoad(48, {0: 48 * 600})]
    measured = 0.0115  # calibration missed the host's share of the step
    errors = [model.observe(load, measured) for _ in range(40)]
    assert errors[0] > 0.15
    assert abs(model.predict(load) - measured) / measured < 0.05
    assert errors[-1] < 0.15
    assert model.call_overhead_s == 0.0


def test_two_whole_step_minibatches_run_one_after_the_other_and_share_the_measurement():
    graphs = GpuPerfModel([(1, 0.004), (64, 0.008)])
    model = DecodeStepModel({0: gpu_kv_node(graphs)}, LAYERS, eager_dense)
    a, b = MiniBatchLoad(1, {0: 500}), MiniBatchLoad(64, {0: 64 * 500})
    assert model.predict([a, b]) == pytest.approx(0.012)
    model.observe([a, b], 0.024)  # twice the prediction: each learns towards twice its share
    assert graphs.predict(1) == pytest.approx(0.004 + 0.1 * 0.004)
    assert graphs.predict(64) == pytest.approx(0.008 + 0.1 * 0.008)


def test_a_minibatch_spread_over_a_shard_too_runs_the_layer_chain():
    graphs = GpuPerfModel([(1, 0.005), (64, 0.008)])
    shard = NodeModel(1, 10**10, KV, LAYERS, 16, ShardPerfModel(1e-4, 3e10))
    model = DecodeStepModel({0: gpu_kv_node(graphs), 1: shard}, LAYERS, eager_dense)
    mixed = MiniBatchLoad(64, {0: 32 * 500, 1: 32 * 500})
    chain = (LAYERS + 1) * 0.018 / (LAYERS + 1) + LAYERS * max(
        model.nodes[0].predict_attend_s(16000), model.nodes[1].predict_attend_s(16000))
    assert model.predict([mixed]) == pytest.approx(chain)
    model.observe([mixed], 2 * chain)
    assert graphs.samples == [(1, 0.005), (64, 0.008)]  # a chain step teaches the call overhead instead
    assert model.call_overhead_s > 0


def test_the_scheduler_predicts_the_gpu_kv_step_from_the_whole_step_model():
    graphs = GpuPerfModel([(1, 0.0093), (64, 0.0126)])
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, admission="all-at-once"), [gpu_kv_node(graphs)],
                      gpu=GpuPerfModel([(1, 0.018), (64, 0.019)]))
    for seq_id in range(64):
        sched.add_request(seq_id, 512, 32)
    sched.schedule()
    everything = [list(range(64))]
    assert sched.predict_decode_s(everything) == pytest.approx(0.0126)
    sched.observe_decode(everything, 0.014)
    assert sched.predict_decode_s(everything) == pytest.approx(0.0126 + 0.1 * (0.014 - 0.0126))


def test_a_whole_step_model_must_learn():
    class PredictOnly:
        def predict(self, batch: float) -> float:
            return 0.01

    with pytest.raises(ValueError, match="whole_step"):
        gpu_kv_node(PredictOnly())


def test_isolated_stalled_steps_barely_move_the_whole_step_model():
    graphs = GpuPerfModel([(1, 0.005), (64, 0.01)])
    model = DecodeStepModel({0: gpu_kv_node(graphs)}, LAYERS, eager_dense)
    load = [MiniBatchLoad(64, {0: 64 * 600})]
    for step in range(100):
        model.observe(load, 0.05 if step % 10 == 9 else 0.01)  # every tenth step stalls 5x
    assert model.predict(load) == pytest.approx(0.01, rel=0.01)


def test_a_step_timed_only_to_its_launch_teaches_no_whole_step_model():
    graphs = GpuPerfModel([(1, 0.005), (64, 0.01)])
    model = DecodeStepModel({0: gpu_kv_node(graphs)}, LAYERS, eager_dense)
    load = [MiniBatchLoad(64, {0: 64 * 600})]
    model.observe(load, 0.0002, is_device_time_included=False)  # an asynchronous graph launch
    assert model.predict(load) == pytest.approx(0.01)
    model.observe(load, 0.012)
    assert model.predict(load) > 0.01
