"""The waiting queue: its order through admissions, requeues and aborts, and what a full batch reads of it."""
from __future__ import annotations

import fastdecode.scheduler.scheduler as scheduler_module
from fastdecode.scheduler import NodeModel, Scheduler, SchedulerConfig, ShardPerfModel
from fastdecode.scheduler.sequences import SequenceTable
from scheduler_helpers import node


def waiting_ids(table: SequenceTable) -> list[int]:
    return [record.seq_id for record in table.waiting()]


def test_the_queue_keeps_arrival_order_through_starts_requeues_and_removals():
    table = SequenceTable()
    for seq_id in (10, 11, 12, 13, 14, 15):
        table.add(seq_id, 8, 8)
    table.start(10, node_id=0, step=1)  # the head
    table.start(13, node_id=0, step=1)  # one behind the head
    table.start(14, node_id=1, step=1)
    assert waiting_ids(table) == [11, 12, 15]
    table.remove(12)  # an abort of a waiting one
    table.add(16, 8, 8)
    table.requeue(14)  # back between 11 and 15, by arrival
    table.requeue(10)  # back at the head
    assert waiting_ids(table) == [10, 11, 14, 15, 16]
    assert table.num_waiting == 5 and table.num_running == 1
    table.remove(13)  # a running one
    table.remove(15)
    table.start(11, node_id=0, step=2)
    table.add(17, 8, 8)
    table.requeue(11)
    assert waiting_ids(table) == [10, 11, 14, 16, 17]
    assert table.num_waiting == 5 and table.num_running == 0


def test_removing_a_waiting_sequence_does_not_scan_the_queue():
    comparisons: list[tuple[int, int]] = []

    class Id(int):
        """A sequence id that records every equality test against another id."""

        __hash__ = int.__hash__

        def __eq__(self, other):
            comparisons.append((int(self), int(other)))
            return int(self) == int(other)

    ids = [Id(i) for i in range(100)]
    table = SequenceTable()
    for seq_id in ids:
        table.add(seq_id, 8, 8)
    table.remove(ids[99])  # behind 99 others
    table.start(ids[50], node_id=0, step=1)  # behind 50 others
    assert comparisons == []
    assert table.num_waiting == 98 and waiting_ids(table)[48:51] == [48, 49, 51]


def test_a_full_batch_reads_nothing_of_the_queue_and_admits_when_a_slot_frees(monkeypatch):
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, admission="all-at-once"), [node(0)])
    for seq_id in range(10):
        sched.add_request(seq_id, 16, 32)
    assert [a.seq_id for a in sched.schedule().admitted] == [0, 1, 2, 3]
    fit_checks: list[int] = []
    can_ever_fit = scheduler_module.can_ever_fit

    def counting_can_ever_fit(nodes, expected_final_len):
        fit_checks.append(expected_final_len)
        return can_ever_fit(nodes, expected_final_len)

    monkeypatch.setattr(scheduler_module, "can_ever_fit", counting_can_ever_fit)
    for _ in range(3):
        plan = sched.schedule()
        assert plan.admitted == () and plan.preempted == ()
        sched.on_tokens(plan.minibatches[0] + plan.minibatches[1])
    assert fit_checks == []  # no free slot: the waiting queue was not read
    assert sched.num_waiting == 6 and sched.num_running == 4
    assert waiting_ids(sched._table) == [4, 5, 6, 7, 8, 9]

    sched.on_finished(2)
    assert [a.seq_id for a in sched.schedule().admitted] == [4]
    assert fit_checks  # a free slot: the queue is read again


def test_sls_paces_on_through_steps_with_no_free_slot():
    """The steps a full batch skips the queue still count for SLS's pacing: the credit they add lets a whole
    group in as soon as slots free (B = 4, 8 tokens expected: 0.5 sequence a step, at most 2 banked)."""
    config = SchedulerConfig(max_num_seqs=4, admission="sls", sls_free_load=0.0, max_total_context=1_000_000)
    sched = Scheduler(config, [node(0)])
    for seq_id in range(12):
        sched.add_request(seq_id, 16, 8)
    for _ in range(20):  # fill the batch at the paced rate, then run full
        sched.schedule()
    assert sched.num_running == 4
    for _ in range(8):
        sched.on_tokens([0, 1])  # they use all of max_tokens: the expected output length stays 8
    sched.on_finished(0)
    sched.on_finished(1)
    assert [a.seq_id for a in sched.schedule().admitted] == [4, 5]
