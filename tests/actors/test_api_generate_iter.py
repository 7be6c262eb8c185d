"""``AsyncLLM.generate`` iterated as vLLM's ``AsyncLLM.generate`` generator (``async for``): results as the tokens
come per ``SamplingParams.output_kind`` (CUMULATIVE, DELTA, FINAL_ONLY), one sample's per output for n > 1, ended by
an abort, raising a failure, and cancelling its request when left early; awaited it gives the final result as
before."""
from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from api_helpers import LONG, PROMPT, is_idle, llm, until, until_idle  # noqa: F401 (llm: a fixture)
from fastdecode.actors.api import GenerateCall, RequestOutputKind, StreamedResult
from fastdecode.actors.generation_results import stream_results
from fastdecode.actors.request import GenerationResult, RequestError, SamplingParams
from fastdecode.actors.stream_outputs import StreamOutput
from test_generation_results import PROMPT as FAKE_PROMPT, CountedOutputs, tokens

ASKED = dict(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2, prompt_logprobs=1)


def completion(result: GenerationResult, index: int = 0) -> tuple:
    """What vLLM's RequestOutput shows of one completion, as plain values."""
    out = result.outputs[index]
    return (out.index, out.token_ids, out.text, out.finish_reason, out.stop_reason, out.cumulative_logprob,
            out.logprobs)


def test_output_kind_takes_vllms_values_and_names_the_field():
    assert SamplingParams().output_kind is RequestOutputKind.CUMULATIVE  # vLLM's default
    assert [kind.value for kind in RequestOutputKind] == [0, 1, 2]
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
    assert SamplingParams(n=2, output_kind=RequestOutputKind.DELTA).samples()[1].output_kind is RequestOutputKind.DELTA
    for bad in ("delta", 3, True, None):
        with pytest.raises(RequestError, match="output_kind must be a RequestOutputKind") as info:
            SamplingParams(output_kind=bad)
        assert info.value.param == "output_kind"


async def test_cumulative_outputs_grow_to_the_awaited_result(llm):
    awaited = await llm.generate(PROMPT, SamplingParams(**ASKED))
    outputs = [out async for out in llm.generate(PROMPT, SamplingParams(**ASKED))]
    assert len(outputs) == 5 and all(isinstance(out, StreamedResult) for out in outputs)
    assert [len(out.outputs[0].token_ids) for out in outputs] == [1, 2, 3, 4, 5]
    assert [out.finished for out in outputs] == [False] * 4 + [True]
    assert [out.outputs[0].finish_reason for out in outputs] == [None] * 4 + ["length"]
    for before, after in zip(outputs, outputs[1:]):
        assert after.outputs[0].text.startswith(before.outputs[0].text)
        assert after.outputs[0].logprobs[:len(before.outputs[0].logprobs)] == before.outputs[0].logprobs
    assert completion(outputs[-1]) == completion(awaited)
    assert all(out.prompt_logprobs == awaited.prompt_logprobs is not None for out in outputs)  # vLLM's, on each
    assert (outputs[0].prompt_token_ids, outputs[0].request_id) == (PROMPT, outputs[-1].request_id)
    await until_idle(llm)


async def test_delta_outputs_hold_what_is_new_and_add_up_to_the_result(llm):
    params = SamplingParams(**ASKED, output_kind=RequestOutputKind.DELTA)
    cumulative = [out async for out in llm.generate(PROMPT, SamplingParams(**ASKED))]
    deltas = [out async for out in llm.generate(PROMPT, params)]
    assert [len(out.outputs[0].token_ids) for out in deltas] == [1] * 5
    assert sum((out.outputs[0].token_ids for out in deltas), []) == cumulative[-1].outputs[0].token_ids
    assert "".join(out.outputs[0].text for out in deltas) == cumulative[-1].outputs[0].text
    assert sum((out.outputs[0].logprobs for out in deltas), []) == cumulative[-1].outputs[0].logprobs
    # vLLM's: a delta's cumulative_logprob is the sum so far, and the prompt's logprobs come once, on the first
    assert [out.outputs[0].cumulative_logprob for out in deltas] == [out.outputs[0].cumulative_logprob
                                                                     for out in cumulative]
    assert [out.prompt_logprobs is not None for out in deltas] == [True] + [False] * 4
    assert [out.finished for out in deltas] == [False] * 4 + [True]
    await until_idle(llm)


async def test_final_only_yields_the_awaited_result_alone(llm):
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=4, ignore_eos=True, n=2)
    awaited = await llm.generate(PROMPT, params)
    final_only = SamplingParams(temperature=0.8, seed=4, max_tokens=4, ignore_eos=True, n=2,
                                output_kind=RequestOutputKind.FINAL_ONLY)
    [only] = [out async for out in llm.generate(PROMPT, final_only)]
    assert only.finished and [completion(only, i) for i in (0, 1)] == [completion(awaited, i) for i in (0, 1)]
    await until_idle(llm)


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
async def test_n_samples_yield_the_sample_that_advanced(llm, kind):
    """As vLLM's parallel sampling streamed: each output holds the one completion that advanced (its ``index``),
    and the request is ``finished`` on the last output of all, which ends the iteration."""
    fields = dict(temperature=0.8, seed=7, max_tokens=4, ignore_eos=True, n=3)
    awaited = await llm.generate(PROMPT, SamplingParams(**fields))
    outputs = [out async for out in llm.generate(PROMPT, SamplingParams(**fields, output_kind=kind))]
    assert len(outputs) == 12 and all(len(out.outputs) == 1 for out in outputs)
    assert [out.finished for out in outputs] == [False] * 11 + [True]
    for index in range(3):
        mine = [out.outputs[0] for out in outputs if out.outputs[0].index == index]
        assert len(mine) == 4 and [o.finish_reason for o in mine] == [None] * 3 + ["length"]
        token_ids = mine[-1].token_ids if kind is RequestOutputKind.CUMULATIVE else sum((o.token_ids for o in mine), [])
        assert token_ids == awaited.outputs[index].token_ids  # sample i seeded seed + i, as awaited
    await until_idle(llm)


@pytest.mark.parametrize("n", [1, 3])
async def test_leaving_an_inline_loop_early_cancels_the_request(llm, n):
    """vLLM's generator is closed when left: the request is aborted and its KV freed (the 1500-token request would
    run on well past the wait otherwise), for each of its n samples."""
    executor = llm.cluster.executor
    async for out in llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True, n=n)):
        if executor.num_running == n:
            break
    assert not out.finished and executor.num_running == n
    await until_idle(llm)


async def test_a_held_call_is_closed_by_aclosing(llm):
    call = llm.generate(PROMPT, LONG, "held")
    async with contextlib.aclosing(call) as outputs:
        async for out in outputs:
            break
    assert out.request_id == "held" and not out.finished
    await until_idle(llm)  # its name is let go too
    await llm.generate(PROMPT, SamplingParams(max_tokens=2), "never-iterated").aclose()  # nothing ran: no-op
    assert await is_idle(llm)


async def test_abort_ends_the_iteration_with_an_abort_output(llm):
    seen = []
    async for out in llm.generate(PROMPT, LONG, "long"):
        seen.append(out)
        if len(seen) == 2:
            await llm.abort("long")
    assert len(seen) < 10 and seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert seen[-1].outputs[0].token_ids == seen[-2].outputs[0].token_ids  # what it made, kept
    assert all(out.request_id == "long" for out in seen)
    await until_idle(llm)


async def test_a_failed_request_raises_out_of_the_iteration(llm, monkeypatch):
    """A step that raises fails the requests it ran (an "error" event): iterated, the generator raises the same
    RequestError that awaiting gives, and the request is freed."""
    executor = llm.cluster.executor
    step = executor.step

    async def failing_step():
        if executor.num_steps >= 2:  # two steps' outputs come first
            raise RuntimeError("the GPU fell over")
        return await step()

    monkeypatch.setattr(executor, "step", failing_step)
    seen = []
    with pytest.raises(RequestError, match="internal error in the decode step: the GPU fell over"):
        async for out in llm.generate(PROMPT, LONG):
            seen.append(out)
    assert 1 <= len(seen) <= 3 and not any(out.finished for out in seen)  # what came before the failure
    await until_idle(llm)


async def test_the_arguments_are_checked_when_called(llm):
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        llm.generate(PROMPT, {"max_tokens": 4})
    with pytest.raises(RequestError, match=f"n={llm.max_num_choices + 1}") as info:
        llm.generate(PROMPT, SamplingParams(n=llm.max_num_choices + 1))
    assert info.value.param == "n"
    with pytest.raises(TypeError, match="request_id must be a str"):
        llm.generate(PROMPT, None, 7)
    running = asyncio.ensure_future(llm.generate(PROMPT, LONG, "taken"))  # a coroutine to tasks, as before
    await until(lambda: "taken" in llm.named_requests)
    with pytest.raises(ValueError, match="'taken' is already in use"):
        llm.generate(PROMPT, None, "taken")
    await llm.abort("taken")
    assert (await running).finish_reason == "abort"


async def test_a_call_is_awaited_or_iterated_once(llm):
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    call = llm.generate(PROMPT, params)
    assert isinstance(call, GenerateCall) and asyncio.iscoroutine(call)
    assert len((await call).token_ids) == 2
    with pytest.raises(RuntimeError, match="was awaited"):
        call.__aiter__()
    iterated = llm.generate(PROMPT, params)
    assert [len(out.token_ids) async for out in iterated] == [1, 2]
    with pytest.raises(RuntimeError, match="was iterated"):
        await iterated
    assert len((await anext(llm.generate(PROMPT, params))).token_ids) == 1  # anext() as on vLLM's generator
    await until_idle(llm)


async def test_a_call_dropped_unused_warns_as_a_coroutine_never_awaited(llm):
    with pytest.warns(RuntimeWarning, match="'AsyncLLM._generate' was never awaited"):
        llm.generate(PROMPT)
        gc.collect()
    assert await is_idle(llm)


async def test_delta_prompt_logprobs_come_once_whichever_sample_is_first():
    """Samples 1..n-1 ask no prompt logprobs (``SamplingParams.samples(is_prompt_logprobs_once=True)``): a delta
    output of another sample before sample 0's first shows none, and sample 0's first shows them, once."""
    released = asyncio.Event()  # sample 0 outputs only once sample 1 has
    first = [StreamOutput(1, 5, "<5>", finish_reason="length", prompt_logprobs=(None, None, None))]
    streams = [CountedOutputs(first, released), CountedOutputs(tokens(2, [7, 8]))]
    params = SamplingParams(n=2, prompt_logprobs=0, output_kind=RequestOutputKind.DELTA)
    seen = []
    async with contextlib.aclosing(stream_results(streams, FAKE_PROMPT, params.samples(True), str,
                                                  params.output_kind)) as results:
        async for out in results:
            seen.append((out.outputs[0].index, out.outputs[0].token_ids, out.prompt_logprobs is not None))
            released.set()
    assert seen == [(1, [7], False), (1, [8], False), (0, [5], True)]
    assert [stream.num_closes for stream in streams] == [1, 1]
