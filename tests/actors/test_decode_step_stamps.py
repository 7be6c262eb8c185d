"""The decode step's end stamps of attend calls, on fake shards and a fake clock (no threads, no sockets).

A shard's link tells only that some reply is waiting (``ShardKVNode.is_attend_done``), and a shard
answers in the order its calls went out; the scheduler turns the stamps into service times.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from fastdecode.actors import decode_step
from fastdecode.actors.decode_step import DecodeStep, MiniBatch, _Call
from fastdecode.scheduler.attend_calls import AttendCall, service_times

MS = 1e-3


class Clock:
    """perf_counter for the decode step: each reading moves on by 1 us, as a real clock does."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-6
        return self.now


class FakeShard:
    """Serves its calls one after the other, ``service_s`` each; the link says whether any reply waits."""

    is_host = False

    def __init__(self, clock: Clock, service_s: float) -> None:
        self.clock, self.service_s = clock, service_s
        self.replies: list[tuple[int, float]] = []  # (request id, when its reply arrives), in send order
        self.num_sent = 0

    def send(self, at: float) -> int:
        free = self.replies[-1][1] if self.replies else at
        self.num_sent += 1
        self.replies.append((self.num_sent, max(free, at) + self.service_s))
        return self.num_sent

    def is_attend_done(self, pending: int) -> bool:
        return bool(self.replies) and self.replies[0][1] <= self.clock.now

    def end_attend(self, pending: int) -> torch.Tensor:
        request_id, arrives = self.replies.pop(0)
        assert request_id == pending, "replies come back in send order"
        self.clock.now = max(self.clock.now, arrives)  # waits for it
        return torch.zeros(1, 1, 1)


def minibatch(index: int) -> MiniBatch:
    return MiniBatch(index, [], np.array([index], dtype=np.int64), [(0, 0, 1)], {0: 100})


@pytest.fixture
def step(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(decode_step, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    shard = FakeShard(clock, service_s=1 * MS)
    step = DecodeStep(types.SimpleNamespace(device=torch.device("cpu")), [shard], runner=None, trace=None)
    return step, clock, shard


def send_both(step, clock, shard):
    """Mini-batch A's call, then B's 0.1 ms later, on the one shard: A's reply at 1 ms, B's at 2 ms."""
    a = _Call(0, 0, shard.send(clock.now), clock.now)
    clock.now += 0.1 * MS
    b = _Call(0, 0, shard.send(clock.now), clock.now)
    step._in_flight = [[a], [b]]
    return a, b


def test_a_poll_stamps_only_the_nodes_oldest_call(step):
    step, clock, shard = step
    a, b = send_both(step, clock, shard)
    clock.now = 1.5 * MS  # A's reply is in, B's is not: the link says "a reply waits" for both
    step._note_arrivals()
    assert a.ended == pytest.approx(1.5 * MS, abs=2e-6) and b.ended is None
    step._collect(minibatch(0), [a], None)
    clock.now = 2.5 * MS
    step._collect(minibatch(1), [b], None)
    calls = [AttendCall(node, tokens, start, end) for node, tokens, start, end in step.drain_attend_times()]
    (_, service_a), (_, service_b) = service_times(calls)
    assert service_a == pytest.approx(1.5 * MS, abs=5e-6)
    assert service_b == pytest.approx(1 * MS, abs=5e-6)  # from A's end to when B's reply was seen


def test_calls_done_before_the_thread_looked_share_one_stamp_and_are_one_observation(step):
    step, clock, shard = step
    a, b = send_both(step, clock, shard)
    clock.now = 3 * MS  # the thread was busy: both replies are in
    step._collect(minibatch(0), [a], None)
    step._collect(minibatch(1), [b], None)
    times = step.drain_attend_times()
    assert times[0][3] == times[1][3]
    [(call, seconds)] = service_times(AttendCall(node, tokens, start, end) for node, tokens, start, end in times)
    assert call.kv_bytes == 100 and seconds == pytest.approx(1.5 * MS, abs=5e-6)  # 3 ms for the two


def test_a_call_stamped_with_its_predecessor_keeps_that_stamp(step):
    """A and B were both in when A was taken (one stamp); when B is taken, A's next-layer call C is in too: C is
    stamped then, B keeps the stamp it shares with A (it was overwritten, and A alone took the time of both)."""
    step, clock, shard = step
    a, b = send_both(step, clock, shard)
    clock.now = 2.5 * MS  # both in
    step._collect(minibatch(0), [a], None)
    c = _Call(0, 0, shard.send(clock.now), clock.now)  # A's next layer: 2.5 -> 3.5 ms
    step._in_flight[0] = [c]
    clock.now = 4 * MS  # the thread was busy again: C is in too
    step._collect(minibatch(1), [b], None)
    assert b.ended == a.ended and c.ended == pytest.approx(4 * MS, abs=5e-6)
    step._collect(minibatch(0), [c], None)
    assert c.ended == pytest.approx(4 * MS, abs=5e-6)
    times = step.drain_attend_times()
    observations = service_times(AttendCall(node, tokens, start, end) for node, tokens, start, end in times)
    assert [seconds / MS for _, seconds in observations] == pytest.approx([1.25, 1.5], abs=0.01)
