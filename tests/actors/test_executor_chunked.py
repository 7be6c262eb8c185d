"""Chunked prefill in the Executor (random:tiny, float32, CPU, KV in torch): the same greedy tokens as
prefilling whole; running sequences get a token every step while a long prompt is prefilled; a prefill
dropped mid-way (abort, preemption, its node dying, stop) leaves nothing behind."""
from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from executor_helpers import collect, greedy, one_prompt_per_pass, prompt, reference_greedy
from executor_helpers import start_executor as start_local
from fastdecode.actors.executor import Executor, ExecutorConfig
from fastdecode.actors.guarded_node import NodeState
from fastdecode.actors.kv_nodes import LocalKVNode
from fastdecode.scheduler import SchedulerConfig
from greedy_compare import assert_same_greedy

_spec = importlib.util.spec_from_file_location(
    "chunked_reliability_helpers", Path(__file__).resolve().parents[1] / "reliability" / "reliability_helpers.py")
_reliability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reliability)
KillableNode = _reliability.KillableNode



async def start_executor(model, max_num_batched_tokens, **kwargs) -> tuple[Executor, list]:
    """``executor_helpers.start_executor`` with each node killable."""
    return await start_local(model, max_num_batched_tokens, wrap=lambda node: KillableNode(node, node.node_id),
                             **kwargs)


def after_each_step(executor: Executor, callback) -> None:
    """Call ``callback()`` after every step the Executor's loop runs (not after one that had nothing to run)."""
    real_step = executor.step

    async def step() -> bool:
        did_run = await real_step()
        if did_run:
            callback()
        return did_run

    executor.step = step


def held_by(nodes, seq_id: int) -> list[str]:
    """The nodes that hold KV of ``seq_id``."""
    return [node.node_id for node in nodes if seq_id in node.inner._num_tokens]


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.002)


def is_mid_prefill(executor: Executor, seq_id: int) -> bool:
    job = executor.prefills.job(seq_id)
    return job is not None and job.num_done > 0


PROMPT_LENGTHS = (3, 16, 33, 48)
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def chunk_references(tiny_model):
    model, _ = tiny_model
    return {n: reference_greedy(model, prompt(n, n), NUM_TOKENS) for n in PROMPT_LENGTHS}


def check_33(chunk_references, tokens: list[int], reason: str | None, label: str) -> None:
    """The 33-token prompt's request ran to its length with the reference's greedy tokens."""
    ref_tokens, gaps = chunk_references[33]
    assert reason == "length", label
    assert_same_greedy(tokens, ref_tokens, gaps, label=label)


async def run_prompts(model, limit) -> tuple[list[list[int]], int]:
    """Greedy tokens of the prompts submitted together, and how many steps ended with a prefill half-done."""
    executor, _ = await start_executor(model, limit)
    try:
        streams = [executor.submit(prompt(n, n), greedy(NUM_TOKENS)) for n in PROMPT_LENGTHS]
        ids = [s.request_id for s in streams]
        mid_steps: list[int] = []
        after_each_step(executor, lambda: mid_steps.append(sum(is_mid_prefill(executor, i) for i in ids)))
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert len(executor.prefills) == 0
    finally:
        await executor.stop()
    assert all(reason == "length" for _, reason in results)
    return [tokens for tokens, _ in results], sum(1 for n in mid_steps if n)


@pytest.mark.parametrize("chunk", [1, 5, 16, 2048])
async def test_chunked_prefill_gives_the_greedy_tokens_of_the_whole_prefill(tiny_model, chunk_references, chunk):
    model, _ = tiny_model
    whole, num_whole_mid = await run_prompts(model, 0)
    chunked, num_chunked_mid = await run_prompts(model, chunk)
    assert num_whole_mid == 0
    # 100 prompt tokens: one or more prompts were prefilled over several steps unless they fit one step
    assert (num_chunked_mid > 0) == (chunk < 64), num_chunked_mid
    for length, ours, theirs in zip(PROMPT_LENGTHS, chunked, whole):
        ref_tokens, gaps = chunk_references[length]
        assert_same_greedy(theirs, ref_tokens, gaps, label=f"whole prefill, prompt {length}")
        assert_same_greedy(ours, theirs, gaps, label=f"chunks of {chunk}, prompt {length}")


async def test_a_prompt_of_exactly_k_chunks_takes_k_steps(tiny_model, chunk_references):
    model, _ = tiny_model
    executor, _ = await start_executor(model, 16)
    try:
        stream = executor.submit(prompt(48, 48), greedy(NUM_TOKENS))
        done: list[int] = []
        after_each_step(executor, lambda: done.append(getattr(executor.prefills.job(stream.request_id),
                                                                  "num_done", -1)))
        tokens, _ = await collect(stream)
    finally:
        await executor.stop()
    assert done[:3] == [16, 32, -1]  # two steps leave it half-done, the third places it
    ref_tokens, gaps = chunk_references[48]
    assert_same_greedy(tokens, ref_tokens, gaps, label="48 tokens in chunks of 16")


@pytest.mark.parametrize("limit", [64, 0], ids=["chunked", "whole"])
async def test_a_running_sequence_gets_a_token_every_step_while_a_long_prompt_prefills(tiny_model, limit):
    """The defect: a long prompt's whole prefill ran in one step, stalling every running stream for it."""
    model, _ = tiny_model
    executor, _ = await start_executor(model, limit)
    try:
        running = executor.submit(prompt(4), greedy(400))
        await anext(running)
        seq = executor._sequences[running.request_id]
        steps: list[tuple[int, int]] = []  # per step: prefill tokens it carried, the running sequence's tokens
        real_take = executor.prefills.take_step
        carried: list[int] = [0]

        def take_step(num_decoding):
            work = real_take(num_decoding)
            assert num_decoding == 1  # the running sequence decodes in the step
            carried[0] = sum(n for _, n in work)
            return work

        executor.prefills.take_step = take_step

        def record() -> None:
            steps.append((carried[0], len(seq.output_ids)))
            carried[0] = 0

        after_each_step(executor, record)
        long_tokens, reason = await collect(executor.submit(prompt(640, 1), greedy(8)))
        await running.aclose()
    finally:
        await executor.stop()
    assert reason == "length" and len(long_tokens) == 8
    counts = [n for _, n in steps]
    assert all(b == a + 1 for a, b in zip(counts, counts[1:])), counts  # one token every step
    prefill_steps = [n for n, _ in steps if n]
    assert sum(prefill_steps) == 640
    if not limit:
        assert prefill_steps == [640]  # as before: all of it in one step
    else:
        assert prefill_steps == [64] * 10  # 1 decoding + 63 would be under the 64-token floor
    ref_tokens, gaps = reference_greedy(model, prompt(640, 1), 8)
    assert_same_greedy(long_tokens, ref_tokens, gaps, label=f"640-token prompt, limit {limit}")


async def test_a_client_gone_mid_prefill_drops_the_job_and_no_kv_is_left(tiny_model, chunk_references):
    model, _ = tiny_model
    executor, nodes = await start_executor(model, 8)
    try:
        stream = executor.submit(prompt(200), greedy(4))
        seq_id = stream.request_id
        cancelled_at: list[int] = []

        def cancel_once_chunked() -> None:
            if is_mid_prefill(executor, seq_id) and not cancelled_at:
                cancelled_at.append(executor.prefills.job(seq_id).num_done)
                stream.cancel()  # what a client disconnect does

        after_each_step(executor, cancel_once_chunked)
        await wait_until(lambda: seq_id not in executor._sequences)
        assert cancelled_at == [8]
        assert executor.prefills.job(seq_id) is None and len(executor.prefills) == 0
        assert held_by(nodes, seq_id) == [] and executor.num_running == executor.num_waiting == 0
        tokens, reason = await collect(executor.submit(prompt(33, 33), greedy(NUM_TOKENS)))  # and it serves on
    finally:
        await executor.stop()
    check_33(chunk_references, tokens, reason, "after an abort mid-prefill")


async def test_stop_mid_prefill_ends_the_request_and_drops_the_job(tiny_model):
    model, _ = tiny_model
    executor, nodes = await start_executor(model, 4)
    stream = executor.submit(prompt(400), greedy(4))
    await wait_until(lambda: is_mid_prefill(executor, stream.request_id))
    await executor.stop()
    events = [event async for event in stream]
    assert [e.finish_reason for e in events] == ["error"] and "shutting down" in events[0].error
    assert len(executor.prefills) == 0 and held_by(nodes, stream.request_id) == []


async def test_a_preemption_mid_prefill_drops_the_job_and_the_request_completes(tiny_model):
    """A 64-token node, overcommitted: the running sequence grows until the node is full and the youngest
    resident, a prompt half-way through its chunked prefill, is preempted; it is rebuilt once there is room."""
    model, _ = tiny_model
    executor, nodes = await start_executor(model, 1, node_tokens=64, overcommit=2.0)
    seen: list[tuple[int, int | None, bool]] = []  # (seq_id, its prefill's progress, dropped with nothing held)
    real_preempt = executor._preempt

    async def preempt(seq, node_index):
        job = executor.prefills.job(seq.seq_id)
        await real_preempt(seq, node_index)
        seen.append((seq.seq_id, job and job.num_done, executor.prefills.job(seq.seq_id) is None
                     and held_by(nodes, seq.seq_id) == []))

    executor._preempt = preempt
    try:
        running = executor.submit(prompt(4, 2), greedy(56))
        first = await anext(running)
        long = executor.submit(prompt(40, 3), greedy(8))
        (running_tokens, _), (long_tokens, long_reason) = await asyncio.gather(collect(running), collect(long))
        running_tokens.insert(0, first.token_id)
        assert all(not node.inner._num_tokens for node in nodes) and len(executor.prefills) == 0
    finally:
        await executor.stop()
    assert len(seen) == 1 and executor.num_preempted == 1
    seq_id, progress, is_dropped = seen[0]
    assert seq_id == long.request_id and 0 < progress < 40 and is_dropped
    assert long_reason == "length"
    for prompt_ids, tokens in ((prompt(4, 2), running_tokens), (prompt(40, 3), long_tokens)):
        ref_tokens, gaps = reference_greedy(model, prompt_ids, len(tokens))
        assert_same_greedy(tokens, ref_tokens, gaps, label="preempted mid-prefill")


def kill(executor: Executor, nodes, index: int) -> None:
    """Node ``index`` stops answering, and its lost heartbeat is noticed (what ``GuardedNode.refresh`` does)."""
    nodes[index].is_dead = True
    executor.nodes[index].mark(NodeState.DEAD, "no heartbeat answer")


async def test_a_node_dying_mid_prefill_requeues_the_prompt_and_it_completes_elsewhere(tiny_model, chunk_references):
    model, _ = tiny_model
    executor, nodes = await start_executor(model, 4, num_nodes=2)
    try:
        stream = executor.submit(prompt(33, 33), greedy(NUM_TOKENS))
        seq_id = stream.request_id
        progress: list[tuple[int, int]] = []  # (node index, positions done) after each step it is half-done

        def kill_its_node_once() -> None:
            job = executor.prefills.job(seq_id)
            if job is not None and job.num_done:
                progress.append((job.node_index, job.num_done))
                if len(progress) == 2:
                    kill(executor, nodes, job.node_index)

        after_each_step(executor, kill_its_node_once)
        tokens, reason = await collect(stream)
        assert len(executor.prefills) == 0 and all(not node.inner._num_tokens for node in nodes)
    finally:
        await executor.stop()
    dead = progress[0][0]
    assert progress[:2] == [(dead, 4), (dead, 8)]
    # dropped with the node: rebuilt from its first position on the other one
    assert progress[2:] == [(1 - dead, n) for n in range(4, 33, 4)]
    assert executor.nodes[dead].state is NodeState.DEAD and executor.num_recovered == 1
    check_33(chunk_references, tokens, reason, "node died mid-prefill")


async def test_the_last_node_dying_mid_prefill_fails_the_request_and_drops_the_job(tiny_model):
    model, _ = tiny_model
    executor, nodes = await start_executor(model, 4)
    try:
        stream = executor.submit(prompt(100), greedy(4))
        after_each_step(executor, lambda: is_mid_prefill(executor, stream.request_id) and kill(executor, nodes, 0))
        events = [event async for event in stream]
        assert [e.finish_reason for e in events] == ["error"] and events[0].is_retryable
        assert len(executor.prefills) == 0 and held_by(nodes, stream.request_id) == []
    finally:
        await executor.stop()


@pytest.mark.parametrize("limit", [64, 0], ids=["chunked", "whole"])
async def test_a_prefill_out_of_gpu_memory_fails_that_request_alone(tiny_model, monkeypatch, limit):
    """A long prompt's prefill stages its K/V beside the GPU KV pool and may run out of GPU memory; the error used
    to fail the step, so every running request. Now that request ends with a clear error and the rest go on."""
    import torch

    from fastdecode.actors.chunked_prefill import PrefillJob

    model, _ = tiny_model
    real_run_chunk = PrefillJob.run_chunk

    def run_chunk(job, *args, **kwargs):
        if len(job.token_ids) == 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.50 GiB")
        return real_run_chunk(job, *args, **kwargs)

    monkeypatch.setattr(PrefillJob, "run_chunk", run_chunk)
    executor, nodes = await start_executor(model, limit)
    try:
        running = executor.submit(prompt(5), greedy(60))
        first = await anext(running)
        failed = executor.submit(prompt(300, 1), greedy(8))
        events = [event async for event in failed]
        rest, reason = await collect(running)
        after = await collect(executor.submit(prompt(7, 2), greedy(6)))
    finally:
        await executor.stop()
    assert events[-1].finish_reason == "error" and "ran out of GPU memory" in events[-1].error
    assert not events[-1].is_retryable and all(e.token_id < 0 for e in events)
    assert reason == "length" and len([first.token_id, *rest]) == 60
    ref_tokens, gaps = reference_greedy(model, prompt(5), 60)
    assert_same_greedy([first.token_id, *rest], ref_tokens, gaps, label="beside a failed prefill")
    assert after[1] == "length" and len(after[0]) == 6
    assert not nodes[0].inner._num_tokens  # nothing left behind


async def test_a_prompt_placed_on_the_executors_device_is_placed_before_the_next_one_is_staged(tiny_model,
                                                                                            one_torch_thread):
    """A node on the Executor's device (not a host) holds a prompt's staged K/V beside its pool until placed: the next
    prompt's forward pass waits for that placement, so two prompts' K/V are never staged at once (the default GPU
    pool leaves room for one). Host nodes keep the overlap."""
    from fastdecode.actors.chunked_prefill import PrefillJob

    model, _ = tiny_model
    executor, _ = await start_executor(model, 0)  # every prompt whole, in one step
    events = []
    run_chunk, place = PrefillJob.run_chunk, executor._place

    def logged_run(job, *args):
        events.append(("run", job.seq.seq_id))
        return run_chunk(job, *args)

    async def logged_place(job, *args):
        is_placed = await place(job, *args)
        events.append(("placed", job.seq.seq_id))
        return is_placed

    executor._place = logged_place
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(PrefillJob, "run_chunk", logged_run)
            one_prompt_per_pass(patch)  # passes of several prompts are the pool's one staging
            streams = [executor.submit(prompt(40, salt), greedy(2)) for salt in range(3)]
            await asyncio.gather(*(collect(s) for s in streams))
    finally:
        await executor.stop()
    seq_ids = sorted({seq_id for _, seq_id in events})
    assert len(seq_ids) == 3
    for first, second in zip(seq_ids, seq_ids[1:]):
        assert events.index(("placed", first)) < events.index(("run", second)), events
