"""AsyncLLM requests named by their caller (vLLM's ``request_id``): reported in the outputs, refused while a live
request holds the name, ended by ``abort(request_id)`` as closing their stream ends them, and forgotten once over."""
from __future__ import annotations

import asyncio
import threading

import pytest

from api_helpers import LONG, PROMPT, THREAD_WAIT_S, is_idle, llm, until, until_idle  # noqa: F401 (llm: a fixture)
from fastdecode.actors.request import SamplingParams

SHORT = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


async def test_the_callers_id_is_reported_and_forgotten_when_the_request_ends(llm):
    result = await llm.generate(PROMPT, SHORT, "req-1")  # vLLM's positional order
    assert (result.request_id, len(result.token_ids), result.finish_reason) == ("req-1", 3, "length")
    outputs = [out async for out in llm.stream(PROMPT, SHORT, request_id="req-2")]
    assert [out.request_id for out in outputs] == ["req-2"] * 3
    assert len(llm.named_requests) == 0
    again = await llm.generate(PROMPT, SHORT, request_id="req-1")  # a finished request's id is free again
    assert again.token_ids == result.token_ids and len(llm.named_requests) == 0
    unnamed = await llm.generate(PROMPT, SHORT)
    assert unnamed.request_id is not None and unnamed.request_id.isdigit()  # the engine's id, as before


async def test_abort_ends_a_live_stream_with_an_abort_output_and_frees_it(llm):
    executor = llm.cluster.executor
    outputs = llm.stream(PROMPT, LONG, request_id="long")
    seen = []
    async for out in outputs:
        seen.append(out)
        if len(seen) == 2:
            assert executor.num_running == 1 and (await llm.cluster.kv_used_bytes())[0] > 0
            assert "long" in llm.named_requests
            await llm.abort("long")
    # the stream goes on only until the engine ends it (a step or so), then ends with vLLM's "abort" output
    assert len(seen) < 10 and seen[-1].finish_reason == "abort" and seen[-1].token_id == -1
    assert all(out.request_id == "long" for out in seen)
    await until_idle(llm)


async def test_abort_ends_generate_and_takes_several_ids(llm):
    tasks = [asyncio.ensure_future(llm.generate(PROMPT, LONG, f"g{i}")) for i in range(2)]
    await until(lambda: llm.cluster.executor.num_running == 2)
    await llm.abort(["g0", "g1"])
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=2.0)
    assert [r.finish_reason for r in results] == ["abort", "abort"]
    assert [r.request_id for r in results] == ["g0", "g1"] and all(len(r.token_ids) < 20 for r in results)
    assert await is_idle(llm)


@pytest.mark.parametrize("n", [1, 3])
async def test_abort_while_the_prompt_is_tokenized_never_runs_it(llm, monkeypatch, n):
    """A text prompt is tokenized off the loop before it is submitted: an abort meanwhile is not lost (the request
    would have run to its max_tokens), and nothing reaches the engine, for any of its n samples."""
    submitted, tokenizing, submit, tokenize = [], threading.Event(), llm.cluster.submit, llm.tokenize
    monkeypatch.setattr(llm.cluster, "submit", lambda *args: submitted.append(args) or submit(*args))
    monkeypatch.setattr(llm, "tokenize", lambda prompt: tokenizing.wait(THREAD_WAIT_S) and tokenize(prompt))
    params = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True, n=n)
    task = asyncio.ensure_future(llm.generate("Hello there", params, "early"))
    await until(lambda: "early" in llm.named_requests)
    await llm.abort("early")
    tokenizing.set()  # the tokenizer's thread goes on only now
    result = await asyncio.wait_for(task, timeout=2.0)
    assert result.request_id == "early"
    assert [(o.index, o.finish_reason, o.token_ids) for o in result.outputs] == [(i, "abort", []) for i in range(n)]
    assert submitted == [] and await is_idle(llm)


async def test_abort_of_an_unknown_or_finished_id_is_a_no_op(llm):
    await llm.abort("never-seen")
    await llm.abort([])
    done = await llm.generate(PROMPT, SHORT, "done")
    running = asyncio.ensure_future(llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8,
                                                                        ignore_eos=True), "other"))
    await until(lambda: "other" in llm.named_requests)
    await llm.abort(["done", "never-seen"])  # neither touches the request that runs
    result = await asyncio.wait_for(running, timeout=5.0)
    assert (done.finish_reason, result.finish_reason, len(result.token_ids)) == ("length", "length", 8)
    assert len(llm.named_requests) == 0


async def test_a_live_id_is_refused_to_a_second_caller(llm):
    first = asyncio.ensure_future(llm.generate(PROMPT, LONG, "dup"))
    await until(lambda: llm.cluster.executor.num_running == 1)
    with pytest.raises(ValueError, match="'dup' is already in use"):
        await llm.generate(PROMPT, SHORT, "dup")
    with pytest.raises(ValueError, match="'dup' is already in use"):
        llm.stream(PROMPT, SHORT, request_id="dup")  # refused when called, as its other arguments
    assert llm.cluster.executor.num_running == 1 and not first.done()  # the first one runs on, untouched
    await llm.abort("dup")
    assert (await asyncio.wait_for(first, timeout=2.0)).finish_reason == "abort"
    assert await is_idle(llm)


async def test_a_stream_made_before_the_name_was_taken_is_refused_when_it_starts(llm):
    later = llm.stream(PROMPT, SHORT, request_id="race")  # free when made
    first = asyncio.ensure_future(llm.generate(PROMPT, LONG, "race"))
    await until(lambda: "race" in llm.named_requests)
    with pytest.raises(ValueError, match="'race' is already in use"):
        await later.__anext__()
    await llm.abort("race")
    assert (await asyncio.wait_for(first, timeout=2.0)).finish_reason == "abort"
    assert len(llm.named_requests) == 0


async def test_an_id_must_be_a_str(llm):
    with pytest.raises(TypeError, match="request_id must be a str"):
        await llm.generate(PROMPT, SHORT, 7)
    with pytest.raises(TypeError, match="request_id must be a str"):
        await llm.abort(7)
    with pytest.raises(TypeError, match="request_id must be a str"):
        await llm.abort(["a", 7])
    assert len(llm.named_requests) == 0


async def test_a_named_stream_closed_early_frees_its_request_and_name(llm):
    outputs = llm.stream(PROMPT, LONG, request_id="closed")
    assert (await outputs.__anext__()).request_id == "closed"
    await outputs.aclose()
    await until(lambda: llm.cluster.executor.num_running == 0, timeout_s=0.5)
    assert await is_idle(llm)
