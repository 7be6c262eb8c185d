"""SLS paces only where attention bounds the step: against the node and GPU models, a burst is admitted at once when
the step at the predicted peak context is about the step with no context, and paced exactly as before otherwise."""
import types

import pytest
from test_admission import arrivals, drive, make_policy

from fastdecode.scheduler import GpuPerfModel, NodeModel, Scheduler, SchedulerConfig, ShardPerfModel
from fastdecode.scheduler.step_model import DecodeStepModel, MiniBatchLoad

LAYERS = 4
KV = 2048 * LAYERS  # bytes per token, all layers


def node(node_id, gbps):
    return NodeModel(node_id, 10**7 * KV, KV, LAYERS, 16, ShardPerfModel(50e-6, gbps * 1e9))


def dense_gpu():
    """A dense step of 20 ms at any batch up to 128 (weight-bound), as the GPU's start-up sweep measures it."""
    return GpuPerfModel([(1, 0.020), (128, 0.021)])


def requests(sched, first_id, count, prompt, max_tokens):
    for seq_id in range(first_id, first_id + count):
        sched.add_request(seq_id, prompt, max_tokens)


def run_steps(sched, num_steps, max_tokens):
    """Schedule, give every running sequence a token, finish those at max_tokens; admitted count per step."""
    admitted = []
    for _ in range(num_steps):
        plan = sched.schedule()
        admitted.append(len(plan.admitted))
        running = plan.minibatches[0] + plan.minibatches[1]
        sched.on_tokens(running)
        for seq_id in running:
            if sched.sequence(seq_id).num_generated == max_tokens:
                sched.on_finished(seq_id)
    return admitted


def test_a_burst_starts_at_once_when_attention_is_cheap_against_dense():
    """Two fast nodes: the whole batch at its peak adds some 6 % to the 21 ms weight-bound dense step (run as one
    mini-batch, which the split picks there). The calibrated models decide from the first step; a later burst past
    sls_free_load goes at once too."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=64), [node(0, 100.0), node(1, 100.0)], dense_gpu())
    requests(sched, 0, 40, prompt=200, max_tokens=300)
    assert len(sched.schedule().admitted) == 40  # at once: paced, the cold start would be the first group alone
    requests(sched, 40, 24, prompt=200, max_tokens=300)
    assert len(sched.schedule().admitted) == 24
    assert sched.num_running == 64 and sched.num_waiting == 0


def test_an_attention_bound_batch_is_paced_exactly_as_before():
    """Slow nodes and long contexts: the step at the peak is many times the dense step, so the Scheduler admits step
    by step what the policy alone (no step model: the pacing before the rule) admits."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=64), [node(0, 0.5)], dense_gpu())
    requests(sched, 0, 300, prompt=1000, max_tokens=256)
    peak = 64 * (1000 + 256)
    assert sched.predict_unplaced_step_s(64, {None: peak}) > 5 * sched.predict_unplaced_step_s(64, {None: 64})
    admitted = run_steps(sched, 700, max_tokens=256)
    policy = make_policy(batch=64)
    before = [num for num, _, _ in drive(policy, arrivals(policy, 300, prompt=1000, max_tokens=256), 700)]
    assert admitted == before
    assert max(admitted) <= 2  # paced, never a burst


def test_without_a_dense_model_the_first_measured_step_tells():
    """The CPU server has no dense sweep: until a decode step is measured, the step is attention alone and SLS
    paces; once the Executor's measured step teaches the dense part, the waiting burst starts."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), [node(0, 5.0)])
    requests(sched, 0, 4, prompt=12, max_tokens=150)
    assert len(sched.schedule().admitted) == 1  # cold start: one group
    assert sched.schedule().admitted == ()  # paced: 4 of 4 is past half the batch
    sched.observe_decode([[0]], 0.040)  # a 40 ms step, under a quarter of a ms of it attention
    assert len(sched.schedule().admitted) == 3


def test_the_margin_sets_how_much_slower_the_peak_step_may_be():
    """A step of 1 s plus 1 ms per 100 tokens of context: 64 sequences peaking at 64 x 512 tokens make it 1.33 s."""
    calls = []

    def step_s(num_seqs, context_by_node):
        calls.append((num_seqs, dict(context_by_node)))
        return 1.0 + sum(context_by_node.values()) * 1e-5

    for margin, expected in ((0.3, 1), (0.4, 64)):
        policy = make_policy(batch=64, sls_attention_margin=margin)
        assert policy.num_to_admit([], arrivals(policy, 64, prompt=256, max_tokens=257), step_s) == expected
    assert calls[:2] == [(64, {None: 64 * 512}), (64, {None: 64})]  # the peak, then one token each, none placed


def test_a_given_context_limit_holds_even_where_attention_is_cheap():
    policy = make_policy(batch=64, max_total_context=2000)
    waiting = arrivals(policy, 10, prompt=100, max_tokens=100)
    running = arrivals(policy, 30, prompt=10, max_tokens=20)  # 40 of 64: past sls_free_load
    # the peak as the running ones end: 30 x 29 + 9 x 119 fits under 2000, 10 x 119 more does not
    assert policy.num_to_admit(running, waiting, lambda n, c: 1.0) == 9
    assert policy.num_to_admit(running, waiting) <= 2  # the rate alone


def test_predict_unsplit_is_the_better_of_even_halves_and_one_minibatch():
    nodes = {0: node(0, 1.0), 1: node(1, 1.0)}
    model = DecodeStepModel(nodes, LAYERS, dense_gpu().predict)
    context = {0: 3000.0, 1: 1000.0}
    halves = [MiniBatchLoad(5, {0: 1500.0, 1: 500.0}), MiniBatchLoad(5, {0: 1500.0, 1: 500.0})]
    single = [MiniBatchLoad(10, context)]
    assert model.predict_unsplit(10, context, is_single_allowed=False) == pytest.approx(model.predict(halves))
    assert model.predict_unsplit(10, context) == pytest.approx(min(model.predict(halves), model.predict(single)))
    assert model.predict_unsplit(1, {0: 10.0}, is_single_allowed=False) == pytest.approx(
        model.predict([MiniBatchLoad(1, {0: 10.0})]))
    assert model.predict_unsplit(0, {}) == 0.0


def test_the_margin_is_validated():
    with pytest.raises(ValueError, match="sls_attention_margin"):
        SchedulerConfig(sls_attention_margin=-0.1)


def test_the_peak_counts_running_sequences_on_their_nodes_and_only_those_left_at_the_peak():
    """Running sequences weigh on the node that holds them, the candidates are not placed yet (None); one that ends
    before the peak is counted on neither side (nor in the sequence count)."""
    policy = make_policy(batch=8)
    running = [types.SimpleNamespace(context_len=100, num_generated=0, max_tokens=200, node_id=0) for _ in range(2)]
    running.append(types.SimpleNamespace(context_len=50, num_generated=0, max_tokens=10, node_id=1))
    waiting = arrivals(policy, 1, prompt=300, max_tokens=200)
    calls = []

    def step_s(num_seqs, context_by_node):
        calls.append((num_seqs, dict(context_by_node)))
        return 1.0

    assert policy.num_to_admit(running, waiting, step_s) == 1
    # the peak is the step before the three 200-step sequences end (199 steps on), the 10-step one gone by then
    assert calls == [(3, {0: 2 * (100 + 199), None: 300 + 199}), (3, {0: 2.0, None: 1.0})]


class FlatWholeStep:
    """A GPU KV node's whole-step model (its CUDA graphs): the step by batch alone, whatever the context."""

    def predict(self, batch):
        return 0.010

    def observe(self, batch, seconds):
        return 0.0


def test_a_node_timed_by_whole_steps_leaves_the_pacing_to_the_rate():
    """The gpu-only server's one node predicts the step by batch alone: the peak would always look free of
    attention, so its step model is not asked and SLS paces as it does with no model."""
    whole = NodeModel(0, 10**7 * KV, KV, LAYERS, 16, ShardPerfModel(50e-6, 0.5e9), whole_step=FlatWholeStep())
    sched = Scheduler(SchedulerConfig(max_num_seqs=64), [whole], dense_gpu())
    requests(sched, 0, 300, prompt=1000, max_tokens=256)
    admitted = run_steps(sched, 300, max_tokens=256)
    policy = make_policy(batch=64)
    before = [num for num, _, _ in drive(policy, arrivals(policy, 300, prompt=1000, max_tokens=256), 300)]
    assert admitted == before and max(admitted) <= 2


def test_unplaced_context_spreads_over_the_open_nodes_and_placed_context_stays_put():
    nodes = [node(0, 1.0), node(1, 1.0), node(2, 1.0)]
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, is_single_minibatch_allowed=False), nodes, dense_gpu())
    sched.close_node(2)  # draining: keeps what it holds, takes nothing new
    predicted = sched.predict_unplaced_step_s(10, {None: 4000.0, 2: 1000.0, 0: 500.0})
    expected = sched.step_model.predict_unsplit(10, {0: 2500.0, 1: 2000.0, 2: 1000.0}, is_single_allowed=False)
    assert predicted == pytest.approx(expected)
    assert sched.predict_unplaced_step_s(0, {}) == 0.0


def test_without_the_pipeline_the_step_is_one_merged_minibatch():
    """--no-pipeline and gpu-only run one mini-batch whatever the split: two halves would overlap attention with
    dense work that never overlaps there."""
    nodes = [node(0, 1.0), node(1, 1.0)]
    context = {0: 30000.0, 1: 10000.0}
    merged = Scheduler(SchedulerConfig(max_num_seqs=64), nodes, dense_gpu(), is_pipelined=False)
    pipelined = Scheduler(SchedulerConfig(max_num_seqs=64, is_single_minibatch_allowed=False), nodes, dense_gpu())
    single = merged.step_model.predict([MiniBatchLoad(40, context)])
    halves = pipelined.step_model.predict_unsplit(40, context, is_single_allowed=False)
    assert halves < single  # the overlap the pipeline would give
    assert merged.predict_unplaced_step_s(40, context) == pytest.approx(single)
    assert pipelined.predict_unplaced_step_s(40, context) == pytest.approx(halves)
