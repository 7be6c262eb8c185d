"""The Executor's recovery from failed, draining and returning KV nodes, on local nodes that can be
killed at a chosen attend (no processes): every stream goes on with exactly its solo greedy tokens."""
from __future__ import annotations

import asyncio
import random

import pytest

from fastdecode.actors.executor import Executor, ExecutorConfig, UnavailableError
from fastdecode.actors.guarded_node import FAULT_CODES, LOST_STATE_CODES, REFUSED_CODES, UNKNOWN_SEQUENCE, NodeState
from fastdecode.actors.kv_nodes import LocalKVNode
from fastdecode.actors.recovery import Backoff, Reconnector, reopen
from fastdecode.actors.request import SamplingParams
from greedy_compare import assert_same_greedy
from reliability_helpers import KillableNode, Revivable, collect, reference_greedy

FAST_BACKOFF = Backoff(initial_s=0.01, max_s=0.05)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def make_requests(model, count: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, model.config.vocab_size) for _ in range(rng.randrange(2, 24))],
             greedy(rng.randrange(12, 28))) for _ in range(count)]


async def run_all(executor, requests):
    """Every request to its end, concurrently: (tokens, finish reason) each."""
    return await asyncio.gather(*(collect(executor.submit(p, s)) for p, s in requests))


async def start_executor(model, num_nodes: int, *, is_pipelined: bool = True):
    inners = [LocalKVNode.for_model(f"n{i}", model, 16 << 20) for i in range(num_nodes)]
    nodes = [KillableNode(inner, f"n{i}") for i, inner in enumerate(inners)]
    factories = [Revivable(inner, f"n{i}") for i, inner in enumerate(inners)]
    executor = Executor(model, nodes, ExecutorConfig(is_pipelined=is_pipelined), eos_token_ids=[],
                        node_factories=factories, reconnect_backoff=FAST_BACKOFF)
    await executor.start()
    return executor, nodes, factories, inners


def check_solo(model, requests, outputs, label: str) -> None:
    for (prompt, params), (tokens, reason) in zip(requests, outputs):
        assert reason == "length" and len(tokens) == params.max_tokens, (label, reason, len(tokens))
        ref_tokens, gaps = reference_greedy(model, prompt, params.max_tokens)
        assert_same_greedy(tokens, ref_tokens, gaps, label=label, min_compared=4)


@pytest.mark.parametrize("is_pipelined", [True, False], ids=["pipeline", "no-pipeline"])
async def test_node_dying_mid_step_loses_and_repeats_no_token(tiny_model, one_torch_thread, is_pipelined):
    model, _ = tiny_model
    executor, nodes, _, inners = await start_executor(model, 3, is_pipelined=is_pipelined)
    try:
        nodes[1].die_at_attend = 3 * model.config.num_layers + 1  # inside the 4th step that uses it
        requests = make_requests(model, 12, seed=1)
        outputs = await run_all(executor, requests)
        assert nodes[1].is_dead and executor.nodes[1].state is NodeState.DEAD
        assert executor.num_recovered > 0
        assert all(n == 0 for n in (len(inners[0]._num_tokens), len(inners[2]._num_tokens)))
    finally:
        await executor.stop()
    check_solo(model, requests, outputs, f"node died, pipeline={is_pipelined}")


async def test_draining_node_hands_its_sequences_over_and_is_freed(tiny_model, one_torch_thread):
    model, _ = tiny_model
    executor, nodes, _, inners = await start_executor(model, 2)
    try:
        requests = make_requests(model, 8, seed=2)
        streams = [executor.submit(p, s) for p, s in requests]
        first = await asyncio.gather(*(anext(s) for s in streams))  # every request has started
        on_node0 = len(inners[0]._num_tokens)
        assert on_node0 > 0
        nodes[0].is_draining = True
        rest = await asyncio.gather(*(collect(s) for s in streams))
        assert executor.nodes[0].state is NodeState.DRAINING
        assert nodes[0].num_freed >= on_node0 and not inners[0]._num_tokens  # all moved away and freed
        assert executor.num_recovered >= on_node0
    finally:
        await executor.stop()
    outputs = [([f.token_id, *tokens], reason) for f, (tokens, reason) in zip(first, rest)]
    check_solo(model, requests, outputs, "drained node")


async def test_no_node_left_fails_running_requests_and_refuses_until_one_returns(tiny_model, one_torch_thread):
    model, _ = tiny_model
    executor, nodes, factories, inners = await start_executor(model, 2)
    try:
        prompt = [5, 6, 7, 8]
        streams = [executor.submit(prompt, greedy(200)) for _ in range(4)]
        await asyncio.gather(*(anext(s) for s in streams))
        for node in nodes:
            node.is_dead = True
        async def last_event(stream):
            return [event async for event in stream][-1]

        ends = await asyncio.wait_for(asyncio.gather(*(last_event(s) for s in streams)), 10)
        assert all(e.finish_reason == "error" and e.is_retryable for e in ends)  # the server's state: 503
        for _ in range(100):
            if not executor.has_live_node:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError, match="no KV node"):
            executor.submit(prompt, greedy(4))
        factories[1].is_back = True  # the same node (its cache kept, as after a cut link) returns
        for _ in range(200):
            if executor.has_live_node:
                break
            await asyncio.sleep(0.01)
        assert executor.nodes[1].is_alive and executor.nodes[1].epoch == 2
        assert not inners[1]._num_tokens  # what the lost epoch left there was freed on return
        tokens, reason = await collect(executor.submit(prompt, greedy(16)))
        assert reason == "length"
        ref_tokens, gaps = reference_greedy(model, prompt, 16)
        assert_same_greedy(tokens, ref_tokens, gaps, label="after the node returned", min_compared=4)
    finally:
        await executor.stop()


async def test_returned_node_is_used_again(tiny_model, one_torch_thread):
    model, _ = tiny_model
    executor, nodes, factories, inners = await start_executor(model, 2)
    try:
        nodes[0].die_at_attend = 1
        requests = make_requests(model, 6, seed=3)
        await asyncio.gather(*(collect(executor.submit(p, s)) for p, s in requests))
        assert executor.nodes[0].state is NodeState.DEAD
        factories[0].is_back = True
        for _ in range(200):
            if executor.nodes[0].is_alive:
                break
            await asyncio.sleep(0.01)
        assert executor.nodes[0].epoch == 2
        before = executor.nodes[0].inner.num_attends
        requests = make_requests(model, 6, seed=4)
        outputs = await asyncio.gather(*(collect(executor.submit(p, s)) for p, s in requests))
        assert executor.nodes[0].inner.num_attends > before  # placement uses it again
    finally:
        await executor.stop()
    check_solo(model, requests, outputs, "returned node")


def test_lost_state_codes_match_the_shard():
    kvshard = pytest.importorskip("fastdecode.actors.kvshard")
    assert {kvshard.NOT_CONFIGURED, kvshard.UNKNOWN_SEQUENCE} <= LOST_STATE_CODES
    assert UNKNOWN_SEQUENCE == kvshard.UNKNOWN_SEQUENCE
    assert REFUSED_CODES == {kvshard.POOL_FULL, kvshard.OUT_OF_MEMORY}
    assert kvshard.BAD_REQUEST in FAULT_CODES


# What a node answers at the 3rd step that uses it -> the node's state after, and the Executor's counter of
# the sequences that moved: a refusal (no room) keeps the node and preempts those rows; a fault (an internal
# error reply) ends its connection as a death does and they are rebuilt elsewhere. Either way no request fails.
ATTEND_ANSWERS = {"refuse": (NodeState.ALIVE, "num_preempted"), "fault": (NodeState.DEAD, "num_recovered")}


@pytest.mark.parametrize("answer", ATTEND_ANSWERS)
@pytest.mark.parametrize("is_pipelined", [True, False], ids=["pipeline", "no-pipeline"])
async def test_a_node_refusing_or_failing_an_attend_loses_no_token(tiny_model, one_torch_thread, is_pipelined,
                                                                   answer):
    model, _ = tiny_model
    state, moved = ATTEND_ANSWERS[answer]
    executor, nodes, _, _ = await start_executor(model, 2, is_pipelined=is_pipelined)
    try:
        setattr(nodes[0], f"{answer}_at_attend", 2 * model.config.num_layers + 1)
        requests = make_requests(model, 10, seed=4)
        outputs = await run_all(executor, requests)
        assert executor.nodes[0].state is state
        assert getattr(executor, moved) > 0
    finally:
        await executor.stop()
    check_solo(model, requests, outputs, f"node answered {answer}, pipeline={is_pipelined}")


async def test_a_stopping_executor_leaves_no_reconnect_and_no_fresh_client_behind(tiny_model):
    """Executor.stop() used to close the reconnector before cancelling the loop: a step boundary could then start a
    new reconnect, and a loop cancelled while reopening a node that came back left that client (its heartbeats, which
    keep a shard daemon's session held) open."""
    model, _ = tiny_model
    factory = Revivable(LocalKVNode.for_model("n0", model, 16 << 20), "n0")
    reconnector = Reconnector([factory], on_ready=lambda: None, backoff=FAST_BACKOFF)
    await reconnector.close()
    reconnector.watch(0)
    await asyncio.sleep(0.05)
    assert factory.num_attempts == 0

    class Hanging(KillableNode):
        is_closed = False

        async def stats(self):
            await asyncio.Event().wait()

        async def close(self):
            self.is_closed = True

    fresh = Hanging(factory.inner, "n0")
    reopening = asyncio.create_task(reopen(0, fresh, []))
    await asyncio.sleep(0.01)
    reopening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reopening
    assert fresh.is_closed


async def start_small_and_large(model):
    """An Executor over a node of 64 tokens and one of 4096 (max_model_len 1024 fits the large one only)."""
    token_bytes = model.config.kv_bytes_per_token(model.dtype.itemsize)
    inners = [LocalKVNode.for_model("small", model, 64 * token_bytes),
              LocalKVNode.for_model("large", model, 4096 * token_bytes)]
    nodes = [KillableNode(inner, inner.node_id) for inner in inners]
    executor = Executor(model, nodes, ExecutorConfig(max_model_len=1024), eos_token_ids=[])
    await executor.start()
    return executor, inners


async def test_a_request_only_an_absent_node_could_hold_is_told_to_retry(tiny_model, one_torch_thread):
    """max_model_len comes from the largest node; while it is away a request that only it could hold is refused
    as unavailable (503, retryable), not as a bad request (400): it is within the model's limits."""
    executor, inners = await start_small_and_large(tiny_model[0])
    try:
        executor.nodes[1].mark(NodeState.DEAD, "its host went away")
        await executor.step()  # the node bookkeeping at a step boundary removes it
        with pytest.raises(UnavailableError, match="retry later"):
            executor.submit(list(range(3, 203)), greedy(8))
        tokens, reason = await collect(executor.submit([5, 6, 7], greedy(8)))  # the small node still serves
        assert reason == "length" and len(tokens) == 8
    finally:
        await executor.stop()


async def test_a_running_request_only_a_node_that_left_could_hold_ends_with_retry(tiny_model, one_torch_thread):
    """A sequence requeued off the only node that could hold its length is not left waiting with its stream silent:
    it ends with a retryable error (503), as a new request of its length is refused; the others go on."""
    executor, inners = await start_small_and_large(tiny_model[0])
    try:
        long = executor.submit(list(range(3, 203)), greedy(400))
        short = executor.submit([5, 6, 7], greedy(24))
        first = await anext(long)
        assert first.finish_reason is None and inners[1]._num_tokens  # on the large node: only it could hold it
        executor.nodes[1].mark(NodeState.DEAD, "its host went away")
        events = [first] + [event async for event in long]
        assert events[-1].finish_reason == "error" and events[-1].is_retryable and "retry later" in events[-1].error
        tokens, reason = await collect(short)
        assert reason == "length" and len(tokens) == 24
        assert executor.num_waiting == 0 and executor.num_running == 0
    finally:
        await executor.stop()


async def test_a_drained_node_is_closed_once_its_sequences_moved_away(tiny_model, one_torch_thread):
    """A shard daemon stops once its drain is over: its client is closed as its node leaves (its heartbeats and
    reconnecting sockets used to run for the life of the server), once, and the other node serves on."""
    model, _ = tiny_model
    nodes = [KillableNode(LocalKVNode.for_model(f"n{i}", model, 16 << 20), f"n{i}") for i in range(2)]
    closed = []

    async def close():
        closed.append(0)

    nodes[0].close = close
    executor = Executor(model, nodes, ExecutorConfig(), eos_token_ids=[])
    await executor.start()
    try:
        streams = [executor.submit(p, s) for p, s in make_requests(model, 6, seed=5)]
        await asyncio.gather(*(anext(s) for s in streams))
        nodes[0].is_draining = True
        await asyncio.gather(*(collect(s) for s in streams))
        tokens, reason = await collect(executor.submit([5, 6, 7], greedy(6)))
        assert reason == "length" and len(tokens) == 6
        assert executor.nodes[0].is_retired and closed == [0]
    finally:
        await executor.stop()
    assert closed == [0]  # not again at stop
