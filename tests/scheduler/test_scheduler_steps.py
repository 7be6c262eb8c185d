import pytest

from fastdecode.scheduler import GpuPerfModel, NodeModel, Scheduler, SchedulerConfig, ShardPerfModel
from fastdecode.scheduler.split import SplitItem, StepTimeModel, fresh_split

LAYERS = 4
KV = 4096 * LAYERS


def node(node_id, speed, capacity_tokens=1_000_000):
    return NodeModel(node_id, capacity_tokens * KV, KV, LAYERS, 16, ShardPerfModel(30e-6, speed * 20e9))


def gpu():
    return GpuPerfModel([(1, 4e-3), (128, 4.5e-3), (512, 12e-3)])


def test_the_faster_shard_receives_more_sequences_and_times_even_out():
    sched = Scheduler(SchedulerConfig(max_num_seqs=120, admission="all-at-once"), [node(0, 1.0), node(1, 3.0)], gpu())
    for seq_id in range(120):
        sched.add_request(seq_id, 100 + seq_id % 7, 400)
    plan = sched.schedule()
    assert len(plan.admitted) == 120
    on_node = [sum(1 for a in plan.admitted if a.node_id == i) for i in (0, 1)]
    assert on_node[1] == pytest.approx(3 * on_node[0], rel=0.1)
    loads = sched.node_loads()
    times = [loads[i].predicted_attend_s() for i in (0, 1)]
    assert max(times) <= 1.05 * min(times)


def test_step_plan_covers_every_running_sequence_once():
    sched = Scheduler(SchedulerConfig(max_num_seqs=32, admission="sls"), [node(0, 1.0), node(1, 2.0)], gpu())
    for seq_id in range(50):
        sched.add_request(seq_id, 64, 128)
    seen_running = 0
    for _ in range(300):
        plan = sched.schedule()
        a, b = plan.minibatches
        assert not set(a) & set(b)
        assert len(a) + len(b) == sched.num_running == plan.num_running
        items = [SplitItem(i, sched.sequence(i).node_id, sched.sequence(i).context_len) for i in a + b]
        model = StepTimeModel(sched.nodes, LAYERS, sched.gpu.predict)
        if items:  # no worse than an even split, nor than not pipelining at all
            assert plan.predicted_step_s == pytest.approx(model.step_s(items, {i: int(i in b) for i in a + b}))
            assert plan.predicted_step_s <= 1.02 * model.step_s(items, fresh_split(items))
            assert plan.predicted_step_s <= 1.02 * model.step_s(items, dict.fromkeys(a + b, 0))
        assert plan.total_context == sum(sched.sequence(s).context_len for s in a + b)
        if plan.num_running:
            assert plan.predicted_step_s > 0
        sched.on_tokens(a + b)
        for seq_id in a + b:
            if sched.sequence(seq_id).num_generated == 128:
                sched.on_finished(seq_id)
        seen_running = max(seen_running, plan.num_running)
    assert seen_running == 32
    assert sched.admission.rate_per_step == pytest.approx(32 / 128)


def test_bad_requests_get_clear_errors_and_change_nothing():
    sched = Scheduler(SchedulerConfig(), [node(0, 1.0, capacity_tokens=1000)])
    with pytest.raises(ValueError, match="more than any node holds"):
        sched.add_request(1, 900, 200)
    with pytest.raises(ValueError, match="prompt_len"):
        sched.add_request(1, 0, 10)
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add_request(1, 10, 0)
    sched.add_request(1, 10, 10)
    with pytest.raises(ValueError, match="already known"):
        sched.add_request(1, 10, 10)
    assert sched.num_waiting == 1
    with pytest.raises(ValueError, match="not running"):
        sched.on_tokens([1])
    with pytest.raises(KeyError):
        sched.on_tokens([2])
    with pytest.raises(ValueError, match="at least one node"):
        Scheduler(SchedulerConfig(), [])
    with pytest.raises(ValueError, match="layers"):
        Scheduler(SchedulerConfig(), [node(0, 1.0), NodeModel(1, 1 << 30, KV, 8, 16, ShardPerfModel(0, 1e9))])


def test_abort_and_token_limits():
    sched = Scheduler(SchedulerConfig(admission="all-at-once"), [node(0, 1.0)])
    sched.add_request(1, 10, 2)
    sched.add_request(2, 10, 5)
    sched.schedule()
    sched.on_tokens([1, 2])
    sched.on_tokens([1])
    with pytest.raises(ValueError, match="already has its 2 tokens"):
        sched.on_tokens([1])
    assert sched.abort(2) and not sched.abort(2)
    sched.on_finished(1)
    assert sched.num_running == sched.num_waiting == 0


def test_measurements_update_the_models():
    sched = Scheduler(SchedulerConfig(), [node(0, 1.0)], gpu())
    before = sched.nodes[0].perf.predict(1e7)
    for _ in range(30):
        sched.observe_attend(0, 1e7, 2 * before)
    assert sched.nodes[0].perf.predict(1e7) == pytest.approx(2 * before, rel=0.02)
    assert sched.nodes[0].perf.relative_error > 0
    err = sched.observe_dense(128, 9e-3)
    assert err == pytest.approx(0.5)
    assert sched.gpu.predict(128) > 4.5e-3
    no_gpu = Scheduler(SchedulerConfig(), [node(0, 1.0)])
    with pytest.raises(ValueError, match="no GPU model"):
        no_gpu.observe_dense(1, 1e-3)
