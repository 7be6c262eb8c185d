"""What an ``LLM``/``AsyncLLM`` holds is let go: on close()/shutdown(), and when one is dropped unclosed; and an
``AsyncLLM`` called from another thread's event loop refuses at once instead of hanging."""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

from api_helpers import PROMPT, THREAD_WAIT_S, TINY
from fastdecode.actors import api, unclosed
from fastdecode.actors.api import LLM, AsyncLLM
from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.executor_config import UnavailableError
from fastdecode.actors.request import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _thread_names() -> list[str]:
    """The live threads' names once a stop's closing thread ("fd-dense-close", which ends just after it hands the
    stop its result) has ended: under load it can still be alive for a moment after the stop returned."""
    deadline = time.monotonic() + THREAD_WAIT_S
    while any(t.name == CLOSING_THREAD for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return sorted(t.name for t in threading.enumerate())


CLOSING_THREAD = "fd-dense-close"  # DenseRunner.close_off_loop's


def _num_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _num_dense_threads() -> int:
    """The dense compute threads (ThreadPoolExecutor's "fd-dense_0"), not a stop's closing thread."""
    return sum(t.name.startswith("fd-dense_") for t in threading.enumerate())


def test_a_dropped_llm_releases_its_threads_and_fds():
    with LLM(**TINY) as warm:  # the first use starts what lives as long as the process (tqdm's monitor...)
        warm.generate(PROMPT, GREEDY, use_tqdm=False)
    gc.collect()
    threads, fds = _thread_names(), _num_fds()
    for _ in range(3):
        llm = LLM(**TINY)
        assert llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].finish_reason == "length"
        inner = llm._llm
        del llm  # never closed
        assert inner.is_closed  # its finalizer stopped the cluster at once
    gc.collect()
    assert _thread_names() == threads
    assert _num_fds() == fds


def test_shutdown_is_close():
    llm = LLM(**TINY)
    llm.shutdown()
    assert llm.is_closed and llm._llm.is_closed
    with pytest.raises(RuntimeError, match="LLM is closed"):
        llm.generate(PROMPT, GREEDY)
    llm.shutdown()  # twice is fine


async def test_an_asyncllm_collected_unstopped_warns_and_stops_its_cluster():
    before = _num_dense_threads()
    llm = await AsyncLLM.start(ClusterConfig(**TINY))
    await llm.generate(PROMPT, GREEDY)  # the dense thread starts with the first step
    assert _num_dense_threads() == before + 1 and llm.loop is asyncio.get_running_loop()
    with pytest.warns(ResourceWarning, match="collected without stop"):
        del llm
        gc.collect()
    deadline = time.monotonic() + 2.0
    while _num_dense_threads() > before:  # stopped by a task on this loop
        assert time.monotonic() < deadline, "the cluster of a dropped AsyncLLM was not stopped"
        await asyncio.sleep(0.01)


def test_an_asyncllm_collected_after_its_loop_closed_lets_its_dense_thread_go():
    before = _num_dense_threads()
    async def start_and_step() -> AsyncLLM:
        started = await AsyncLLM.start(ClusterConfig(**TINY))
        await started.generate(PROMPT, GREEDY)  # the dense thread starts with the first step
        return started

    llm = asyncio.run(start_and_step())  # the loop closes, the AsyncLLM lives on
    assert _num_dense_threads() == before + 1
    with pytest.warns(ResourceWarning, match="collected without stop"):
        del llm
        gc.collect()
    assert _num_dense_threads() == before


async def test_asyncllm_shutdown_stops_it():
    llm = await AsyncLLM.start(ClusterConfig(**TINY))
    await llm.shutdown()
    assert llm.is_closed
    with pytest.raises(RuntimeError, match="LLM is closed"):
        await llm.generate(PROMPT, GREEDY)


async def test_a_stream_made_before_the_stop_and_read_after_it_is_refused_not_hung():
    """stream() submits when iteration starts; one that starts after the stop (or while it runs) used to reach an
    Executor whose loop had ended, and waited for ever."""
    llm = await AsyncLLM.start(ClusterConfig(**TINY))
    early = llm.stream(PROMPT, GREEDY)
    await llm.stop()
    with pytest.raises(RuntimeError, match="LLM is closed"):
        await asyncio.wait_for(anext(early), THREAD_WAIT_S)
    with pytest.raises(UnavailableError, match="shutting down"):
        llm.cluster.submit(PROMPT, GREEDY)  # the Executor itself refuses once stopped


async def test_stop_after_an_unawaited_shutdown_waits_for_that_stop():
    """``llm.shutdown()`` not awaited, then ``async with``'s exit: the exit used to return at once (closed already)
    while the stop ran on, and the loop's end could cancel it half-way; now it waits for the same stop."""
    before = _num_dense_threads()
    async with await AsyncLLM.start(ClusterConfig(**TINY)) as llm:
        await llm.generate(PROMPT, GREEDY)  # the dense thread starts with the first step
        stopping = llm.shutdown()
    assert stopping.done() and stopping.exception() is None
    assert llm.cluster.executor._task is None and _num_dense_threads() == before


def test_a_call_from_another_threads_loop_is_refused_not_hung():
    """The AsyncLLM runs on the LLM's thread; a coroutine on this thread's own loop gets a RuntimeError that names
    the way (run_coroutine_threadsafe), which then works."""
    with LLM(**TINY) as llm:
        async_llm = llm._llm
        outcomes: list[object] = []

        async def from_another_loop() -> None:
            for call in (lambda: async_llm.generate(PROMPT, GREEDY), lambda: async_llm.submit(PROMPT, GREEDY),
                         lambda: async_llm.stream(PROMPT, GREEDY), lambda: async_llm.shutdown()):
                try:
                    result = call()
                    if asyncio.iscoroutine(result):
                        await result
                    outcomes.append(result)
                except RuntimeError as exc:
                    outcomes.append(exc)
            future = asyncio.run_coroutine_threadsafe(async_llm.generate(PROMPT, GREEDY), async_llm.loop)
            outcomes.append(await asyncio.wrap_future(future))

        thread = threading.Thread(target=lambda: asyncio.run(from_another_loop()), daemon=True)
        thread.start()
        thread.join(THREAD_WAIT_S)
        assert not thread.is_alive(), "a call from another event loop hung"
        *refusals, result = outcomes
        assert len(refusals) == 4
        assert all(isinstance(r, RuntimeError) and "run_coroutine_threadsafe" in str(r) for r in refusals), refusals
        assert result.finish_reason == "length" and len(result.token_ids) == 3
        assert not async_llm.is_closed


def test_a_stream_made_outside_a_loop_runs_on_its_loop():
    with LLM(**TINY) as llm:
        stream = llm._llm.stream(PROMPT, GREEDY)  # no loop runs here: checked when iterated

        async def read() -> list[int]:
            return [out.token_id async for out in stream]
        assert len(llm._call(read())) == 3


# A script that leaves LLMs unclosed (no shard; an in-process shard; one on its own loop's thread, whose stop joins
# that thread through the default executor) and exits: at exit their clusters must be stopped before the thread pools
# shut down. An atexit hook (run after the LLMs' close) reports it.
EXIT_UNCLOSED = textwrap.dedent("""
    import atexit, threading
    from fastdecode.actors.api import LLM
    from fastdecode.actors.request import SamplingParams
    llms = [LLM(model="random:tiny", seed=0, dtype="float32", device="cpu", num_shards=n,
                shard_kv_memory_bytes=16 << 20 if n else None, is_shard_loop_threaded=is_threaded)
            for n, is_threaded in ((0, False), (1, False), (1, True))]
    for llm in llms:
        print(llm.generate([318, 72, 101], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)[0].finish_reason)
    def report():
        names = sorted(t.name for t in threading.enumerate() if t.name.startswith(("fastdecode", "fd-", "kvshard")))
        print("closed", [llm._llm.is_closed for llm in llms], "threads", names, flush=True)
    atexit.register(report)
""")


@pytest.mark.slow
def test_an_llm_left_unclosed_at_exit_stops_its_cluster_silently():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", EXIT_UNCLOSED], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for bad in ("Traceback", "RuntimeError", "Task was destroyed", "never awaited"):
        assert bad not in done.stderr, done.stderr
    assert done.stdout.splitlines() == ["length"] * 3 + ["closed [True, True, True] threads []"], done.stdout


def test_a_cluster_stops_after_its_loops_default_executor_shut_down():
    """asyncio.run, and the interpreter's exit, shut the default executor down: stopping must not need it."""
    before = _num_dense_threads()

    async def run() -> bool:
        llm = await AsyncLLM.start(ClusterConfig(**TINY))
        await llm.generate(PROMPT, GREEDY)  # the dense thread starts with the first step
        await asyncio.get_running_loop().shutdown_default_executor()
        await llm.stop()
        return llm.is_closed

    assert asyncio.run(run())
    assert _num_dense_threads() == before


class _StopAwaitingAFuture:
    """A cluster (or AsyncLLM) whose stop() waits on a future only its own task holds: the task is collectable
    unless whoever started it holds it. ``gate`` (weak) lets the test end the wait."""

    def __init__(self) -> None:
        self.gate: weakref.ref | None = None
        self.is_stopped = False

    async def stop(self) -> None:
        gate = asyncio.get_running_loop().create_future()
        self.gate = weakref.ref(gate)
        await gate
        self.is_stopped = True


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + THREAD_WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_an_llm_collected_on_its_own_thread_holds_its_stop_until_done():
    serving = api._LoopThread()
    llm = _StopAwaitingAFuture()
    try:
        serving.loop.call_soon_threadsafe(api._shut_down, serving, llm)  # as when collected on that thread
        _wait_for(lambda: llm.gate is not None, "the stop did not start")
        collected: concurrent.futures.Future = concurrent.futures.Future()
        serving.loop.call_soon_threadsafe(lambda: collected.set_result(gc.collect()))  # once the stop waits
        collected.result(THREAD_WAIT_S)
        gate = llm.gate()
        assert gate is not None, "the stop's task was collected before it ended"
        serving.loop.call_soon_threadsafe(gate.set_result, None)
        del gate
        serving.thread.join(THREAD_WAIT_S)
        assert llm.is_stopped and not serving.thread.is_alive()  # the stop ended, then the loop and its thread
    finally:
        serving.end()


async def test_an_asyncllm_collected_unstopped_holds_its_clusters_stop_until_done():
    cluster = _StopAwaitingAFuture()
    with pytest.warns(ResourceWarning, match="collected without stop"):
        unclosed.release_unstopped(asyncio.get_running_loop(), cluster)
    deadline = time.monotonic() + THREAD_WAIT_S
    while cluster.gate is None:
        assert time.monotonic() < deadline, "the stop did not start"
        await asyncio.sleep(0.005)
    gc.collect()  # the stop waits on its gate meanwhile
    gate = cluster.gate()
    assert gate is not None, "the stop's task was collected before it ended"
    gate.set_result(None)
    del gate
    while not cluster.is_stopped or any(t.name == "fastdecode-stop" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the stop, or the thread holding it, did not end"
        await asyncio.sleep(0.005)
