"""The daemon's drainable shard: the drain's idle test, what counts as activity, and two Executors on one shard."""
from __future__ import annotations

import asyncio
import time

import ml_dtypes
import numpy as np
import pytest

from fastdecode.actors.kvshard import KVShard, ShardConfig
from fastdecode.actors.runtime import ActorError
from fastdecode.actors.shard_drain import DrainableShard, drain
from fastdecode.transport.shard_messages import Allocate, Attend, Configure, Free, GetStats

pytestmark = pytest.mark.timeout(60)

SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16")


@pytest.fixture
def drainable():
    shard = DrainableShard(KVShard(ShardConfig(kv_memory_bytes=16 << 20, num_threads=1, is_calibrating=False)))
    yield shard
    shard.close()


def _configure(shard: DrainableShard, session_id: int):
    return shard.on_configure(Configure(**SHAPE, session_id=session_id))


async def test_a_shard_idle_before_the_signal_still_waits_for_the_executor(drainable) -> None:
    """The idle test counts from the drain's start at the earliest: a shard with no request for longer than the
    idle limit before SIGTERM used to stop at once, leaving its sequences unmoved."""
    _configure(drainable, 1)
    drainable.on_allocate(Allocate((1, 2)))
    drainable.last_request_s -= 10.0  # idle for 10 s before the signal

    async def executor_moves_them() -> None:
        await asyncio.sleep(0.3)
        drainable.on_free(Free((1, 2)))

    mover = asyncio.create_task(executor_moves_them())
    start = time.monotonic()
    num_left = await drain(drainable, timeout_s=30.0, hurry=asyncio.Event(), idle_s=1.0, poll_s=0.01)
    await mover
    assert num_left == 0 and 0.25 < time.monotonic() - start < 1.0
    assert drainable.is_draining


async def test_a_drain_no_executor_serves_ends_after_the_idle_limit(drainable) -> None:
    """Stats polls are no sequence work: a monitor polling the shard does not hold the drain open."""
    _configure(drainable, 1)
    drainable.on_allocate(Allocate((1,)))

    async def monitor() -> None:
        while True:
            drainable.on_get_stats(GetStats())
            await asyncio.sleep(0.02)

    polling = asyncio.create_task(monitor())
    start = time.monotonic()
    try:
        num_left = await drain(drainable, timeout_s=30.0, hurry=asyncio.Event(), idle_s=0.3, poll_s=0.01)
    finally:
        polling.cancel()
    assert num_left == 1 and 0.25 < time.monotonic() - start < 2.0
    hurry = asyncio.Event()
    hurry.set()
    assert await drain(drainable, timeout_s=30.0, hurry=hurry) == 1  # a second signal: at once


def test_a_second_executor_is_refused_while_the_first_one_runs(drainable) -> None:
    """A Configure of another session must not free the sequences of an Executor that is still sending requests;
    the refusal is ``busy`` with a message the second Executor prints at start."""
    _configure(drainable, 1)
    drainable.on_allocate(Allocate((1, 2)))
    with pytest.raises(ActorError) as info:
        _configure(drainable, 2)
    assert info.value.code == "busy" and "another Executor" in info.value.message
    assert drainable.num_sequences == 2
    assert _configure(drainable, 1).num_sequences == 2  # the holder itself reconnects: kept
    drainable.on_free(Free((1,)))


def test_a_killed_executors_leftovers_are_freed_once_it_is_silent(drainable) -> None:
    """Refused Configures do not count as the holder's activity: a new Executor that retries gets in once the
    one that holds the sequences has been silent for ``session_timeout_s``."""
    timeout_s = drainable.shard.config.session_timeout_s
    _configure(drainable, 1)
    drainable.on_allocate(Allocate((1, 2)))
    drainable.last_request_s -= timeout_s - 1.0  # the holder went silent a while ago, not long enough
    for _ in range(3):
        with pytest.raises(ActorError, match="busy|another Executor"):
            _configure(drainable, 2)
        drainable.on_get_stats(GetStats())
    drainable.last_request_s -= 1.5  # now it has been silent past the limit
    assert _configure(drainable, 2).num_sequences == 0
    drainable.on_allocate(Allocate((1, 2)))  # the ids are free again


def test_an_idle_executor_whose_heartbeats_come_keeps_the_shard(drainable) -> None:
    """An idle Executor sends only heartbeats: while they come (tagged with its session) another session is
    refused even though the shard holds no sequence and no request came for longer than the timeout; once they
    stop for ``session_timeout_s`` the new one gets in."""
    timeout_s = drainable.shard.config.session_timeout_s
    heard = {1: 0.5}
    drainable.seconds_since_ping = heard.get
    _configure(drainable, 1)
    drainable.last_request_s -= 10 * timeout_s  # no request for long: the old rule would let anyone in
    with pytest.raises(ActorError) as info:
        _configure(drainable, 2)
    assert info.value.code == "busy" and "heartbeat" in info.value.message
    assert _configure(drainable, 1).num_sequences == 0  # the holder itself is always let in
    heard[1] = timeout_s + 0.1  # its heartbeats stopped: it is gone
    assert _configure(drainable, 2).num_sequences == 0
    heard.pop(1)
    drainable.last_request_s -= 10 * timeout_s
    with pytest.raises(ActorError, match="heartbeat"):  # now session 2 is the one whose heartbeats count
        heard[2] = 0.1
        _configure(drainable, 3)


def test_a_client_naming_no_session_cannot_reshape_a_held_shard(drainable) -> None:
    """A held, idle shard (no sequence) whose Executor's heartbeats come: a Configure naming no session (session 0)
    with another shape is refused, not obeyed (it used to rebuild the pool, and the holder's next prompt failed the
    shape check, losing the shard for good). The same shape is only asked for its stats; a lapsed holder lets it in."""
    timeout_s = drainable.shard.config.session_timeout_s
    heard = {1: 0.5}
    drainable.seconds_since_ping = heard.get
    _configure(drainable, 1)
    with pytest.raises(ActorError) as info:
        drainable.on_configure(Configure(**{**SHAPE, "head_dim": 128}, session_id=0))
    assert info.value.code == "busy" and "names no session" in info.value.message
    assert drainable.on_configure(Configure(**SHAPE, session_id=0)).num_sequences == 0
    assert _configure(drainable, 1).num_sequences == 0  # still the holder's, in its shape
    heard[1] = timeout_s + 0.1
    drainable.on_configure(Configure(**{**SHAPE, "head_dim": 128}, session_id=0))


def test_the_session_timeout_is_twice_the_executors_dead_peer_window() -> None:
    from fastdecode.actors.cluster import ClusterConfig

    cluster = ClusterConfig()
    window_s = (cluster.liveness + 1) * cluster.heartbeat_interval_s
    assert ShardConfig(kv_memory_bytes=1 << 20).session_timeout_s == 2 * window_s


def _attend_one(seq_id: int) -> Attend:
    q = np.zeros((1, 2, 64), ml_dtypes.bfloat16)
    return Attend(0, np.array([seq_id], np.int64), q, q, q)


def test_a_draining_shard_serves_what_it_holds_and_refuses_new_sequences(drainable) -> None:
    """The drain used to refuse attends at once, so an Executor with nowhere else to go lost every sequence."""
    _configure(drainable, 1)
    drainable.on_allocate(Allocate((1, 2)))
    drainable.is_draining = True
    assert drainable.on_attend(_attend_one(1)).o.shape == (1, 2, 64)
    for message in (Allocate(()), Allocate((3,))):  # the empty one is the Executor's drain probe
        with pytest.raises(ActorError) as info:
            drainable.on_allocate(message)
        assert info.value.code == "draining"
    drainable.on_free(Free((2,)))
    assert drainable.num_sequences == 1


async def test_the_drain_waits_for_a_live_executor_until_the_deadline_then_refuses(drainable) -> None:
    """No request for longer than the idle limit, but the holder's heartbeats come (a busy Executor): the shard
    waits to its deadline, then refuses the sequences' work with a message naming the deadline."""
    _configure(drainable, 1)
    drainable.on_allocate(Allocate((1,)))
    drainable.seconds_since_ping = {1: 0.1}.get
    drainable.last_request_s -= 10.0
    start = time.monotonic()
    num_left = await drain(drainable, timeout_s=0.5, hurry=asyncio.Event(), idle_s=0.1, poll_s=0.01, grace_s=0.1)
    assert num_left == 1 and time.monotonic() - start >= 0.5
    with pytest.raises(ActorError) as info:
        drainable.on_attend(_attend_one(1))
    assert info.value.code == "draining" and "deadline" in info.value.message
    drainable.on_free(Free((1,)))  # freeing is still served
