import random

import pytest

from fastdecode.scheduler.config import SchedulerConfig
from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import ShardPerfModel
from fastdecode.scheduler.preemption import Resident, choose_victims, youngest
from fastdecode.scheduler.scheduler import Scheduler
from scheduler_helpers import KV, PAGE, node


def test_choose_victims_youngest_first_until_it_fits():
    residents = [Resident(10, 0, 5), Resident(11, 3, 4), Resident(12, 1, 2), Resident(13, 2, 3)]
    assert choose_victims(residents, 14) == []
    assert choose_victims(residents, 13) == [11]  # arrival 3 is the youngest
    assert choose_victims(residents, 7) == [11, 13]
    assert choose_victims(residents, 0) == [11, 13, 12, 10]
    assert youngest(residents).seq_id == 11
    assert youngest([]) is None


def run_to_completion(sched, targets, max_steps=20_000):
    """Drive the scheduler like the Executor would; returns the per-sequence produced token indices."""
    produced = {seq_id: [] for seq_id in targets}
    preempted_log = []
    for _ in range(max_steps):
        if not (sched.num_waiting or sched.num_running):
            return produced, preempted_log
        plan = sched.schedule()
        for p in plan.preempted:
            preempted_log.append(p)
            assert p.num_generated == len(produced[p.seq_id])  # progress kept
        for a in plan.admitted:
            rec = sched.sequence(a.seq_id)
            # prompt + its own output but the last token, which the decode step feeds in
            assert a.num_prefill_tokens == rec.prompt_len + max(len(produced[a.seq_id]) - 1, 0)
            assert a.num_generated == len(produced[a.seq_id])
        # memory: what the running sequences hold during this step fits every node
        held = {}
        for seq_id in plan.minibatches[0] + plan.minibatches[1]:
            rec = sched.sequence(seq_id)
            held[rec.node_id] = held.get(rec.node_id, 0) + sched.nodes[rec.node_id].pages_for(rec.context_len)
        for node_id, pages in held.items():
            assert pages <= sched.nodes[node_id].num_pages
        running = plan.minibatches[0] + plan.minibatches[1]
        for seq_id in running:
            produced[seq_id].append(len(produced[seq_id]))  # token index i, whatever the batch
        sched.on_tokens(running)
        for seq_id in running:
            if len(produced[seq_id]) == targets[seq_id]:
                sched.on_finished(seq_id)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("admission", ["sls", "all-at-once"])
def test_nodes_too_small_for_all_every_request_completes_with_all_its_tokens(admission):
    rng = random.Random(7)
    # 2 small nodes; overcommit lets more in than fits at max_tokens, so nodes do fill up and preempt.
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=16, admission=admission, overcommit=3.0), [node(0, 640), node(1, 960, 2.0)]
    )
    targets = {}
    for seq_id in range(40):
        prompt, max_tokens = rng.randint(8, 60), rng.randint(20, 200)
        sched.add_request(seq_id, prompt, max_tokens)
        targets[seq_id] = rng.randint(max_tokens // 2, max_tokens)
    produced, preempted = run_to_completion(sched, targets)
    assert preempted, "the test must exercise preemption"
    for seq_id, target in targets.items():
        assert produced[seq_id] == list(range(target))
    assert sched.num_running == sched.num_waiting == 0


def test_out_of_memory_report_preempts_the_youngest_and_requeues_it_by_arrival():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, admission="all-at-once"), [node(0, 10_000)])
    for seq_id in range(4):
        sched.add_request(seq_id, 10, 50)
    sched.add_request(99, 10, 50)  # arrives last
    plan = sched.schedule()
    assert len(plan.admitted) == 5
    sched.on_tokens([0, 1, 2, 3, 99])
    victim = sched.on_out_of_memory(0)
    assert (victim.seq_id, victim.node_id, victim.num_generated) == (99, 0, 1)
    assert sched.sequence(99).num_preemptions == 1 and not sched.sequence(99).is_running
    again = sched.on_out_of_memory(0)
    assert again.seq_id == 3
    sched.add_request(100, 10, 50)
    plan = sched.schedule()
    # requeued by arrival: 3 before 99, both before the newcomer 100
    assert [a.seq_id for a in plan.admitted] == [3, 99, 100]
    assert plan.admitted[1].is_resumed and plan.admitted[1].num_prefill_tokens == 10
    assert sched.on_out_of_memory(0).seq_id == 100  # 99 keeps its age: the newcomer is younger
    with pytest.raises(KeyError):
        sched.on_out_of_memory(5)


def test_preempting_a_named_sequence_requeues_it_and_refuses_a_waiting_one():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, admission="all-at-once"), [node(0, 10_000)])
    for seq_id in range(3):
        sched.add_request(seq_id, 10, 50)
    sched.schedule()
    sched.on_tokens([0, 1, 2])
    preemption = sched.preempt(1)  # a node refused its attend: not the youngest, this one
    assert (preemption.seq_id, preemption.node_id, preemption.num_generated) == (1, 0, 1)
    assert not sched.sequence(1).is_running and sched.sequence(1).num_preemptions == 1
    with pytest.raises(ValueError, match="not running"):
        sched.preempt(1)
    assert [a.seq_id for a in sched.schedule().admitted] == [1]


def test_removing_a_node_requeues_its_sequences():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, admission="all-at-once"), [node(0, 10_000), node(1, 10_000)])
    for seq_id in range(6):
        sched.add_request(seq_id, 10, 50)
    sched.schedule()
    on_one = [s for s in range(6) if sched.sequence(s).node_id == 1]
    assert on_one
    preempted = sched.remove_node(1)
    assert sorted(p.seq_id for p in preempted) == on_one
    plan = sched.schedule()
    assert sorted(a.seq_id for a in plan.admitted) == on_one
    assert all(a.node_id == 0 for a in plan.admitted)
    with pytest.raises(ValueError, match="last node"):
        sched.remove_node(0)


def test_a_sequence_only_a_removed_node_could_hold_waits_without_holding_the_queue():
    big, small = node(0, 4096), node(1, 1024)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, admission="all-at-once"), [big, small])
    sched.add_request(1, 2000, 100)  # only the big node holds it
    sched.remove_node(0)  # its host taken out before the request started
    sched.add_request(2, 10, 10)
    for _ in range(3):
        admitted = [a.seq_id for a in sched.schedule().admitted]
        if admitted:
            break
    assert admitted == [2]  # not stuck behind the request no node left can hold
    assert not sched.sequence(1).is_running and sched.num_waiting == 1
    sched.add_node(big)  # the node returns
    assert [(a.seq_id, a.node_id) for a in sched.schedule().admitted] == [(1, 0)]


@pytest.mark.parametrize("max_reserved_output, num_admitted", [(None, 1), (64, 8)])
def test_requests_with_a_context_sized_max_tokens_share_a_node_up_to_the_reservation(max_reserved_output,
                                                                                      num_admitted):
    # Chat requests without max_tokens get the rest of the context (here the whole node): reserving all of it
    # runs them one at a time; reserving at most 64 tokens ahead runs them together.
    config = SchedulerConfig(max_num_seqs=16, admission="all-at-once", max_reserved_output=max_reserved_output)
    sched = Scheduler(config, [node(0, 2048)])
    for seq_id in range(8):
        sched.add_request(seq_id, 32, 2048 - 32)
    assert len(sched.schedule().admitted) == num_admitted


def test_a_small_node_reserves_at_most_an_eighth_of_itself_per_sequence():
    # 4096 tokens: the default 4096-token reservation would be the whole node; an eighth (512) lets seven start
    # (each 32 + 512 tokens, 34 pages of 16; 256 pages in all)
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, admission="all-at-once"), [node(0, 4096)])
    for seq_id in range(10):
        sched.add_request(seq_id, 32, 4096 - 32)
    assert len(sched.schedule().admitted) == 7
    assert sched.node_loads()[0].num_final_tokens == 7 * (32 + 512)


def test_sequences_that_outgrow_their_reservation_are_preempted_and_all_complete():
    config = SchedulerConfig(max_num_seqs=16, admission="all-at-once", max_reserved_output=64)
    sched = Scheduler(config, [node(0, 2048)])
    short = {seq_id: 100 for seq_id in range(8)}  # 8 x (32 + 100) tokens fit the node together
    for seq_id in short:
        sched.add_request(seq_id, 32, 2048 - 32)
    produced, preempted = run_to_completion(sched, short)
    assert not preempted and all(produced[s] == list(range(100)) for s in short)
    long = {seq_id: 600 for seq_id in range(10, 18)}  # 8 x 632 tokens do not: the node fills and preempts
    for seq_id in long:
        sched.add_request(seq_id, 32, 2048 - 32)
    produced, preempted = run_to_completion(sched, long)
    assert preempted
    assert all(produced[s] == list(range(600)) for s in long)


def test_a_reservation_slides_ahead_of_the_sequence_and_stops_at_max_tokens():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, admission="all-at-once", max_reserved_output=64),
                      [node(0, 4096)])
    sched.add_request(0, 32, 100)
    sched.add_request(1, 32, 1000)
    sched.schedule()
    records = [sched.sequence(0), sched.sequence(1)]
    assert [r.reserved_final_len(64) for r in records] == [32 + 64, 32 + 64]
    for _ in range(50):
        sched.on_tokens([0, 1])
    records = [sched.sequence(0), sched.sequence(1)]
    assert [r.reserved_final_len(64) for r in records] == [32 + 100, 32 + 50 + 64]
    assert [r.reserved_final_len(None) for r in records] == [32 + 100, 32 + 1000]
    assert sched.node_loads()[0].num_final_tokens == 132 + 146


def test_a_closed_node_keeps_its_sequences_and_takes_no_new_one_until_removed():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, admission="all-at-once"), [node(0, 10_000), node(1, 10_000)])
    for seq_id in range(4):
        sched.add_request(seq_id, 10, 50)
    sched.schedule()
    on_zero = sorted(s for s in range(4) if sched.sequence(s).node_id == 0)
    assert on_zero
    sched.close_node(0)
    for seq_id in range(4, 8):
        sched.add_request(seq_id, 10, 50)
    plan = sched.schedule()
    assert [a.node_id for a in plan.admitted] == [1] * 4  # the closed node takes none of the newcomers
    assert sorted(s for s in range(8) if sched.sequence(s).node_id == 0) == on_zero  # and keeps what it held
    sched.remove_node(1)
    for seq_id in range(4, 8):
        assert not sched.sequence(seq_id).is_running
    assert sched.schedule().admitted == ()  # only the closed node is left: the requeued ones wait
    with pytest.raises(KeyError):
        sched.close_node(5)


def test_a_replaced_last_node_opens_again_with_its_new_model_and_requeues_what_it_held():
    """The last node is never removed: when it comes back as a new instance it replaces its old model (here half
    the capacity), takes new sequences again, and the ones still placed on the old instance wait to be rebuilt."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, admission="all-at-once"), [node(0, 10_000)])
    sched.add_request(0, 10, 50)
    sched.schedule()
    sched.close_node(0)
    sched.add_request(1, 10, 50)
    assert sched.schedule().admitted == ()
    preempted = sched.replace_node(node(0, 5_000))
    assert [(p.seq_id, p.node_id) for p in preempted] == [(0, 0)]
    assert sched.nodes[0].capacity_bytes == 5_000 * KV
    assert sorted(a.seq_id for a in sched.schedule().admitted) == [0, 1]
    with pytest.raises(KeyError):
        sched.replace_node(node(3, 100))
    with pytest.raises(ValueError, match="layers"):
        sched.replace_node(NodeModel(0, 5_000 * KV, KV, 3, PAGE, ShardPerfModel(10e-6, 1e9)))
