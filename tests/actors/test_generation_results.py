"""Gathering a request's n samples' outputs into one GenerationResult (``stream_results`` of FINAL_ONLY, what an
awaited ``generate`` gives): each stream is closed once however it ends, no engine needed."""
from __future__ import annotations

import asyncio

import pytest

from fastdecode.actors.api_inputs import TokenizedPrompt
from fastdecode.actors.async_llm import StreamOutput
from fastdecode.actors.generation_results import final_result, stream_results
from fastdecode.actors.request import RequestError, RequestOutputKind, SamplingParams

PROMPT = TokenizedPrompt([1, 2, 3], None)


async def gather(streams, samples):
    return await final_result(stream_results(streams, PROMPT, samples, str, RequestOutputKind.FINAL_ONLY))


class CountedOutputs:
    """A request's outputs, read from ``outputs`` (after ``is_released`` where given), counting its ``aclose``."""

    def __init__(self, outputs: list[StreamOutput], is_released: asyncio.Event | None = None) -> None:
        self._outputs = iter(outputs)
        self._is_released = is_released
        self.num_closes = 0

    def __aiter__(self) -> "CountedOutputs":
        return self

    async def __anext__(self) -> StreamOutput:
        if self._is_released is not None:
            await self._is_released.wait()
        try:
            return next(self._outputs)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.num_closes += 1


def tokens(request_id: int, token_ids: list[int]) -> list[StreamOutput]:
    *middle, last = token_ids
    return ([StreamOutput(request_id, token_id, f"<{token_id}>") for token_id in middle]
            + [StreamOutput(request_id, last, f"<{last}>", finish_reason="length")])


async def test_samples_gathered_to_their_end_close_each_stream_once():
    streams = [CountedOutputs(tokens(7, [5, 6])), CountedOutputs(tokens(8, [9]))]
    samples = SamplingParams(n=2, max_tokens=2).samples()
    result = await gather(streams, samples)
    assert [(o.index, o.token_ids, o.text, o.finish_reason) for o in result.outputs] == [
        (0, [5, 6], "<5><6>", "length"), (1, [9], "<9>", "length")]
    assert [stream.num_closes for stream in streams] == [1, 1]  # by its own reader, and not again


async def test_a_failed_sample_closes_every_stream_however_far_it_was_read():
    never = asyncio.Event()  # the second sample's output never comes: its gather is cancelled
    failed = [StreamOutput(3, -1, "", finish_reason="error", error="the node failed")]
    streams = [CountedOutputs(failed), CountedOutputs(tokens(4, [5]), never)]
    with pytest.raises(RequestError, match="the node failed"):
        await gather(streams, SamplingParams(n=2).samples())
    assert all(stream.num_closes >= 1 for stream in streams)
