"""What ``AsyncLLM.generate`` gives, built from the outputs of its samples' streams (``stream_results``): awaited, one
GenerationResult (vLLM's ``RequestOutput``), sample 0's holding the others (FINAL_ONLY's, ``final_result``); iterated,
results as the tokens come, per ``SamplingParams.output_kind`` (vLLM's ``AsyncLLM.generate`` generator)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastdecode.actors.api_inputs import TokenizedPrompt
from fastdecode.actors.logprob_dicts import prompt_logprob_dicts, sample_logprob_dicts
from fastdecode.actors.request import (
    CompletionOutput,
    GenerationResult,
    Logprob,
    RequestError,
    RequestOutputKind,
    SamplingParams,
)

if TYPE_CHECKING:
    from fastdecode.actors.stream_outputs import StreamOutput, SubmittedStream

    Outputs = AsyncGenerator[StreamOutput, None] | SubmittedStream  # a request's outputs, closed by aclose()
TokenText = Callable[[int], str]  # a token id's text (Tokenizer.token_text), for the logprob dicts
INLINE_LOGPROB_POSITIONS = 8  # up to this many new positions' logprob dicts are made on the loop, more on a thread


class SampleBuilder:
    """One sample's outputs added up: its GenerationResult so far (``result``)."""

    def __init__(self, prompt: TokenizedPrompt, params: SamplingParams, token_text: TokenText) -> None:
        self.prompt = prompt
        self.params = params
        self.token_text = token_text
        self.result = GenerationResult(prompt_token_ids=prompt.token_ids, prompt=prompt.text,
                                       num_logprobs=params.logprobs,
                                       position_logprobs=None if params.logprobs is None else [])
        self._ranks: list[int | None] = []  # of each sampled token, where logprobs were asked for
        self._tops: list[tuple[tuple[int, float], ...]] = []

    async def add(self, out: StreamOutput) -> None:
        """One output of the sample's stream; RequestError if it is the sample's failure."""
        result = self.result
        result.request_id = str(out.request_id)  # the caller's id, else the engine's (a str, as vLLM's)
        if out.prompt_logprobs is not None:  # off the loop: a long prompt's tokens take a while to decode
            result.prompt_logprobs = await asyncio.to_thread(
                prompt_logprob_dicts, self.prompt.token_ids, out.prompt_logprobs, self.token_text)
        if out.token_id >= 0:
            result.token_ids.append(out.token_id)
            if out.logprob is not None and self.params.logprobs is not None:  # a batch-mate's ask is not ours
                result.logprobs.append(out.logprob)
                self._ranks.append(out.rank)
                self._tops.append(out.top_logprobs)  # cut to this request's logprobs by the sampler
        result.text += out.text
        if out.finish_reason == "error":
            raise RequestError(out.error or "generation failed")
        result.finish_reason = out.finish_reason
        result.stop_reason = out.stop_reason

    async def add_position_logprobs(self) -> None:
        """vLLM's logprob dicts (``result.position_logprobs``) of the tokens added since the last call, where logprobs
        were asked for: made off the loop where there are many (a whole request's, awaited)."""
        positions = self.result.position_logprobs
        if positions is None:
            return
        start, result = len(positions), self.result
        args = (result.token_ids[start:], result.logprobs[start:], self._ranks[start:], self._tops[start:],
                self.token_text)
        if len(result.logprobs) - start > INLINE_LOGPROB_POSITIONS:
            positions += await asyncio.to_thread(sample_logprob_dicts, *args)
        else:
            positions += sample_logprob_dicts(*args)


@dataclass
class StreamedResult(GenerationResult):
    """One output of an iterated ``generate`` (vLLM's ``RequestOutput`` of a streamed request): one sample's output,
    everything so far (CUMULATIVE) or what is new since its last output (DELTA). As vLLM's, ``outputs`` holds that
    sample alone (its ``index`` among the request's n), ``finished`` is True once every sample has finished, and
    ``cumulative_logprob`` is the sample's whole sum, a delta's too."""

    index: int = 0
    is_request_finished: bool = False
    cumulative_logprob: float | None = None

    @property
    def outputs(self) -> list[CompletionOutput]:
        return [StreamedCompletion(self, self.index)]

    @property
    def finished(self) -> bool:
        return self.is_request_finished


class StreamedCompletion(CompletionOutput):
    """``CompletionOutput`` of a StreamedResult: its cumulative_logprob is the sample's, not its delta's."""

    __slots__ = ()

    @property
    def cumulative_logprob(self) -> float | None:
        return self._result.cumulative_logprob


async def merged_outputs(streams: Sequence["Outputs"]) -> AsyncGenerator[tuple[int, StreamOutput], None]:
    """The outputs of several streams as they come, each with its stream's index; a stream's exception is raised
    here. Every stream is closed when this ends, however it ends (one never read from included)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as outputs:
            async for out in outputs:
                yield 0, out
        return
    arrived: asyncio.Queue[tuple[int, StreamOutput | Exception | None]] = asyncio.Queue()
    is_started = [False] * len(streams)

    async def pump(index: int, stream: "Outputs") -> None:
        is_started[index] = True
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    arrived.put_nowait((index, out))
        except Exception as exc:  # raised to the reader, which closes the others
            arrived.put_nowait((index, exc))
        else:
            arrived.put_nowait((index, None))  # this stream ended

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        num_open = len(tasks)
        while num_open:
            index, out = await arrived.get()
            if isinstance(out, Exception):
                raise out
            if out is None:
                num_open -= 1
            else:
                yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream, was_started in zip(streams, is_started):
            if not was_started:  # a task cancelled before it started never closed its stream
                await stream.aclose()


async def stream_results(streams: Sequence["Outputs"], prompt: TokenizedPrompt, samples: Sequence[SamplingParams],
                         token_text: TokenText, kind: RequestOutputKind) -> AsyncGenerator[GenerationResult, None]:
    """The results of one request's samples (``SamplingParams.samples``, one stream each) as vLLM's AsyncLLM yields
    them: CUMULATIVE and DELTA, a StreamedResult per output of a sample, that sample's (the request's prompt logprobs
    on each CUMULATIVE output, on the first DELTA one); FINAL_ONLY, one result at the end, sample 0's holding the
    others (``GenerationResult.other_samples``). RequestError if a sample fails; if one fails (its submission refused
    too), or this is closed early, every stream is closed (a submitted request cancelled, read or not; one
    submitted when first read never submitted) before this ends."""
    builders = [SampleBuilder(prompt, params, token_text) for params in samples]
    num_sent_tokens, num_sent_chars = [0] * len(builders), [0] * len(builders)
    num_open, is_prompt_logprobs_sent = len(builders), False
    async with contextlib.aclosing(merged_outputs(streams)) as outputs:
        async for index, out in outputs:
            builder = builders[index]
            await builder.add(out)
            if out.finish_reason is not None:
                num_open -= 1
            if kind is RequestOutputKind.FINAL_ONLY:
                continue
            await builder.add_position_logprobs()
            prompt_logprobs = builders[0].result.prompt_logprobs  # asked of sample 0 alone (generate)
            if kind is RequestOutputKind.DELTA:
                if is_prompt_logprobs_sent:
                    prompt_logprobs = None
                elif prompt_logprobs is not None:
                    is_prompt_logprobs_sent = True
                yield _streamed(builder, index, num_sent_tokens[index], num_sent_chars[index], prompt_logprobs,
                                is_request_finished=num_open == 0)
                num_sent_tokens[index] = len(builder.result.token_ids)
                num_sent_chars[index] = len(builder.result.text)
            else:
                yield _streamed(builder, index, 0, 0, prompt_logprobs, is_request_finished=num_open == 0)
    if kind is RequestOutputKind.FINAL_ONLY:
        for builder in builders:
            await builder.add_position_logprobs()
        first, *others = (builder.result for builder in builders)
        first.other_samples = others
        yield first


def _streamed(builder: SampleBuilder, index: int, first_token: int, first_char: int,
              prompt_logprobs: list[dict[int, Logprob] | None] | None, *, is_request_finished: bool) -> StreamedResult:
    """A sample's output from its ``first_token`` and ``first_char`` on (0: all of it), its lists copies."""
    result = builder.result
    positions = result.position_logprobs
    return StreamedResult(
        prompt_token_ids=result.prompt_token_ids, token_ids=result.token_ids[first_token:],
        text=result.text[first_char:], finish_reason=result.finish_reason, logprobs=result.logprobs[first_token:],
        prompt=result.prompt, stop_reason=result.stop_reason, request_id=result.request_id,
        num_logprobs=result.num_logprobs, prompt_logprobs=prompt_logprobs,
        position_logprobs=None if positions is None else positions[first_token:], index=index,
        is_request_finished=is_request_finished, cumulative_logprob=CompletionOutput(result).cumulative_logprob)


async def final_result(results: AsyncGenerator[GenerationResult, None]) -> GenerationResult:
    """The last of ``results`` (``stream_results`` of FINAL_ONLY yields one), closed however this ends."""
    last = None
    async with contextlib.aclosing(results):
        async for last in results:
            pass
    if last is None:
        raise RuntimeError("the request's results ended with no result")
    return last

