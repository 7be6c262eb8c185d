"""vLLM's AsyncLLM health surface (``is_running``, ``is_stopped``, ``errored``, ``dead_error``, ``check_health``),
told by the Executor's step loop itself: a step that raises fails its requests and the engine lives on; a loop that
ends without ``stop()`` leaves a dead engine, which refuses new requests; a stop is a stop, not an error."""
from __future__ import annotations

import asyncio

import pytest

from api_helpers import LONG, PROMPT, TINY, is_idle, llm, until  # noqa: F401 (llm: a fixture)
from fastdecode.actors.api import AsyncLLM, EngineDeadError
from fastdecode.actors.engine_health import EngineHealth
from fastdecode.actors.executor_config import UnavailableError
from fastdecode.actors.request import RequestError, SamplingParams

SHORT = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def health(llm: AsyncLLM) -> tuple[bool, bool, bool]:
    return llm.is_running, llm.is_stopped, llm.errored


async def test_a_running_engine_is_healthy(llm):
    assert health(llm) == (True, False, False)
    await llm.check_health()
    assert "runs" in str(llm.dead_error)


async def test_a_stopped_engine_is_stopped_not_errored():
    llm = await AsyncLLM.start(**TINY)
    await llm.generate(PROMPT, SHORT)
    await llm.stop()
    assert health(llm) == (False, True, False)
    with pytest.raises(EngineDeadError, match="stopped"):
        await llm.check_health()


async def test_a_step_that_raises_fails_its_requests_and_the_engine_lives_on(llm, monkeypatch):
    executor = llm.cluster.executor
    step = executor.step
    calls = []

    async def fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the GPU fell over")
        return await step()

    monkeypatch.setattr(executor, "step", fails_once)
    with pytest.raises(RequestError, match="the GPU fell over"):
        await llm.generate(PROMPT, SHORT)
    assert health(llm) == (True, False, False)
    await llm.check_health()
    assert len((await llm.generate(PROMPT, SHORT)).token_ids) == 3  # it serves on
    assert await is_idle(llm)


async def test_a_step_loop_that_ends_without_stop_leaves_a_dead_engine(monkeypatch):
    """A cancellation raised inside a step (an awaited future cancelled by something other than ``stop()``) gets
    past the loop's handling and ends it: no request would run any more, so the engine reports itself dead, refuses
    new requests at once with its ``dead_error``, and still stops cleanly."""
    llm = await AsyncLLM.start(**TINY)
    executor = llm.cluster.executor

    async def stray_cancellation():
        raise asyncio.CancelledError()

    monkeypatch.setattr(executor, "step", stray_cancellation)
    stranded = asyncio.ensure_future(llm.generate(PROMPT, LONG))
    await until(lambda: llm.errored)
    assert health(llm) == (False, True, True)
    with pytest.raises(EngineDeadError, match="ended without stop.*cancellation raised inside a step"):
        await llm.check_health()
    for call in (lambda: llm.generate(PROMPT, SHORT), lambda: llm.stream(PROMPT, SHORT),
                 lambda: llm.submit(PROMPT, SHORT)):
        with pytest.raises(EngineDeadError):
            call()
    with pytest.raises(RequestError, match="step loop ended.*must be restarted"):  # ended at once, not at stop
        await asyncio.wait_for(stranded, 5.0)
    with pytest.raises(UnavailableError, match="step loop ended"):  # the engine's own refusal, as over HTTP
        executor.submit(PROMPT, SHORT)
    await llm.stop()  # still closes the nodes and frees the stranded request's KV
    assert health(llm) == (False, True, True)  # died before it was stopped


async def test_a_loop_that_died_of_an_exception_still_stops(monkeypatch):
    """A step that raises while its requests are failed (``_fail`` itself raising) ends the loop with that
    exception: the requests end with the error at once, and ``stop()`` closes the engine instead of re-raising."""
    llm = await AsyncLLM.start(**TINY)
    executor = llm.cluster.executor

    async def broken_step():
        raise RuntimeError("the step broke")

    async def broken_fail(*args):
        raise RuntimeError("failing the requests broke too")

    monkeypatch.setattr(executor, "step", broken_step)
    monkeypatch.setattr(executor, "_fail", broken_fail)
    with pytest.raises(RequestError, match="step loop ended.*failing the requests broke too"):
        await asyncio.wait_for(llm.generate(PROMPT, LONG), 5.0)
    assert llm.errored and isinstance(llm.dead_error.__cause__, RuntimeError)
    await asyncio.wait_for(llm.stop(), 10.0)
    assert llm.is_stopped and llm.cluster.executor.is_stopped


async def test_the_cause_of_a_loop_that_raised_is_the_dead_errors(monkeypatch):
    """A step that raises a BaseException gets past the loop's handling, which fails only Exceptions: the loop task
    ends with it, and ``dead_error`` names it and chains it."""

    class Fatal(BaseException):
        pass

    llm = await AsyncLLM.start(**TINY)
    executor = llm.cluster.executor

    async def fatal_step():
        raise Fatal("the step loop broke")

    monkeypatch.setattr(executor, "step", fatal_step)
    stranded = asyncio.ensure_future(llm.generate(PROMPT, LONG))
    await until(lambda: llm.errored)
    watch = EngineHealth(executor)
    error = watch.dead_error(is_closed=False)
    assert watch.errored and not watch.is_running
    assert "Fatal: the step loop broke" in str(error) and isinstance(error.__cause__, Fatal)
    with pytest.raises(RequestError):
        await asyncio.wait_for(stranded, 5.0)
    await llm.stop()


async def test_get_tokenizer_is_awaited_as_vllms(llm):
    tokenizer = await llm.get_tokenizer()
    assert tokenizer is llm.tokenizer and tokenizer.decode(tokenizer.encode("Hello")).endswith("Hello")
