"""Attend service times from measured call intervals, and why the step model needs them."""
from __future__ import annotations

import pytest

from fastdecode.scheduler import AttendCall, GpuPerfModel, NodeModel, Scheduler, SchedulerConfig, ShardPerfModel
from fastdecode.scheduler.attend_calls import service_times

MS = 1e-3


def services(calls):
    return [(call.node_id, pytest.approx(seconds)) for call, seconds in service_times(calls)]


def test_calls_that_never_overlap_keep_their_round_trip():
    calls = [AttendCall(0, 10, 0.0, 2 * MS), AttendCall(0, 10, 3 * MS, 4 * MS), AttendCall(1, 10, 0.0, 5 * MS)]
    assert services(calls) == [(0, 2 * MS), (0, 1 * MS), (1, 5 * MS)]


def test_a_call_that_waited_for_another_on_its_node_counts_from_that_calls_end():
    # B started at 1 ms while A (0..4 ms) was on the node; B ended at 7 ms: the node spent 3 ms on it
    a, b = AttendCall(0, 10, 0.0, 4 * MS), AttendCall(0, 10, 1 * MS, 7 * MS)
    assert services([b, a]) == [(0, 4 * MS), (0, 3 * MS)]
    # a call on another node does not shorten it
    assert services([a, b, AttendCall(1, 10, 0.5 * MS, 6 * MS)])[1] == (0, 3 * MS)


def test_calls_are_taken_in_the_order_they_ended():
    # the later-started call ended first: it keeps its round trip, the other counts from its end
    first, second = AttendCall(0, 10, 0.0, 6 * MS), AttendCall(0, 10, 1 * MS, 2 * MS)
    assert services([first, second]) == [(0, 1 * MS), (0, 4 * MS)]


def test_calls_of_one_node_ending_at_one_reading_are_one_observation_their_mean_call():
    # both replies were first seen at 5 ms: the node spent 5 - 1 = 4 ms on the two, split unknown
    a, b = AttendCall(0, 100, 1 * MS, 5 * MS), AttendCall(0, 300, 2 * MS, 5 * MS)
    earlier, other_node = AttendCall(0, 10, 0.0, 1 * MS), AttendCall(1, 10, 0.0, 5 * MS)
    result = service_times([b, other_node, a, earlier])
    assert [(call.node_id, call.kv_bytes, seconds) for call, seconds in result] == [
        (0, 10, pytest.approx(1 * MS)), (0, 200, pytest.approx(2 * MS)), (1, 10, pytest.approx(5 * MS))]
    assert (result[1][0].start_s, result[1][0].end_s) == (1 * MS, 5 * MS)
    # a later call counts from the group's end
    later = AttendCall(0, 10, 4 * MS, 6 * MS)
    assert services([a, b, later])[1] == (0, 1 * MS)


def test_a_mean_call_is_what_a_linear_time_model_predicts():
    # truth: 0.5 ms + 1 us per byte; two calls of 1000 and 3000 bytes back to back take 5 ms together
    calls = [AttendCall(0, 1000, 0.0, 5 * MS), AttendCall(0, 3000, 0.0, 5 * MS)]
    [(call, seconds)] = service_times(calls)
    assert seconds == pytest.approx(0.5 * MS + call.kv_bytes * 1e-6)


def test_bad_calls_are_refused():
    with pytest.raises(ValueError):
        AttendCall(0, 10, 2.0, 1.0)
    with pytest.raises(ValueError):
        AttendCall(0, -1, 0.0, 1.0)
    with pytest.raises(ValueError):
        AttendCall(0, 10, float("nan"), 1.0)


def attention_bound_scheduler() -> Scheduler:
    """One layer, one node; a dense call takes 1 ms, the node's calibration says 1 ms per call."""
    node = NodeModel(0, 10**9, 1000, 1, 16, ShardPerfModel(0.0, 1e8))  # 100 tokens: 1e5 B -> 1 ms
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, admission="all-at-once"), [node],
                      gpu=GpuPerfModel([(1, 2 * MS), (64, 2 * MS)]))  # T(n) / (L + 1) = 1 ms
    for seq_id in (0, 1):
        sched.add_request(seq_id, 100, 10)
    sched.schedule()
    return sched


def test_the_node_learns_its_service_time_and_the_step_is_predicted_exactly():
    # Truth: the node serves a call in 3 ms.  A: dense 0-1, attend 1-4, dense 4-5.  B: dense 1-2,
    # attend sent at 2 but served 4-7 (after A's), dense 7-8.  The step takes 8 ms.
    a, b = AttendCall(0, 1e5, 1 * MS, 4 * MS), AttendCall(0, 1e5, 2 * MS, 7 * MS)
    groups = [[0], [1]]
    by_interval, by_round_trip = attention_bound_scheduler(), attention_bound_scheduler()
    for _ in range(30):
        by_interval.observe_attend_calls([a, b])
        by_interval.observe_decode(groups, 8 * MS)
        by_round_trip.observe_attend(0, 1e5, 3 * MS)
        by_round_trip.observe_attend(0, 1e5, 5 * MS)  # B's round trip includes its 2 ms wait for A
        by_round_trip.observe_decode(groups, 8 * MS)
    assert by_interval.nodes[0].perf.predict(1e5) == pytest.approx(3 * MS, rel=1e-3)
    assert by_interval.predict_decode_s(groups) == pytest.approx(8 * MS, rel=1e-3)
    # fed round trips, the node looks about 4 ms per call (the recent ones weigh more) and the
    # simulation charges B's wait a second time: 10 ms, which no Executor overhead (>= 0) undoes
    assert by_round_trip.predict_decode_s(groups) == pytest.approx(10 * MS, rel=0.01)
    assert by_round_trip.step_model.call_overhead_s == 0.0
