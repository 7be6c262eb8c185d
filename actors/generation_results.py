"""What ``AsyncLLM.generate`` returns, gathered from its outputs: one stream's into a GenerationResult (vLLM's
``RequestOutput``), and the n samples of one request (``SamplingParams.n``) into one, sample 0's with the others."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING

from fastdecode.actors.api_inputs import TokenizedPrompt
from fastdecode.actors.logprob_dicts import prompt_logprob_dicts, sample_logprob_dicts
from fastdecode.actors.request import GenerationResult, RequestError, SamplingParams

if TYPE_CHECKING:
    from fastdecode.actors.async_llm import StreamOutput, SubmittedStream

    Outputs = AsyncGenerator[StreamOutput, None] | SubmittedStream  # a request's outputs, closed by aclose()
TokenText = Callable[[int], str]  # a token id's text (Tokenizer.token_text), for the logprob dicts


async def gather_result(outputs: "Outputs", prompt: TokenizedPrompt, params: SamplingParams,
                        token_text: TokenText) -> GenerationResult:
    """One request's outputs to its end (the stream closed however this ends), its GenerationResult; RequestError
    if it failed."""
    result = GenerationResult(prompt_token_ids=prompt.token_ids, prompt=prompt.text, num_logprobs=params.logprobs)
    ranks: list[int | None] = []  # of each sampled token, where logprobs were asked for
    tops: list[tuple[tuple[int, float], ...]] = []
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            result.request_id = str(out.request_id)  # the caller's id, else the engine's (a str, as vLLM's)
            if out.prompt_logprobs is not None:  # off the loop: a long prompt's tokens take a while to decode
                result.prompt_logprobs = await asyncio.to_thread(
                    prompt_logprob_dicts, prompt.token_ids, out.prompt_logprobs, token_text)
            if out.token_id >= 0:
                result.token_ids.append(out.token_id)
                if out.logprob is not None and params.logprobs is not None:  # a batch-mate's ask is not ours
                    result.logprobs.append(out.logprob)
                    ranks.append(out.rank)
                    tops.append(out.top_logprobs)  # cut to this request's logprobs by the sampler
            result.text += out.text
            if out.finish_reason == "error":
                raise RequestError(out.error or "generation failed")
            result.finish_reason = out.finish_reason
            result.stop_reason = out.stop_reason
    if params.logprobs is not None:
        result.position_logprobs = await asyncio.to_thread(
            sample_logprob_dicts, result.token_ids, result.logprobs, ranks, tops, token_text)
    return result


async def gather_samples(streams: Sequence["Outputs"], prompt: TokenizedPrompt,
                         samples: Sequence[SamplingParams], token_text: TokenText) -> GenerationResult:
    """The streams of one request's samples (``SamplingParams.samples``), read together: sample 0's result holding
    the others (``GenerationResult.other_samples``). If one fails (its submission refused too), or this is
    cancelled, every stream is closed (a submitted request cancelled, read or not; one submitted when first read
    never submitted) before this returns."""
    tasks = [asyncio.ensure_future(gather_result(stream, prompt, params, token_text))
             for stream, params in zip(streams, samples)]
    try:
        first, *others = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:  # a task cancelled before it started never closed its stream
            await stream.aclose()
        raise
    first.other_samples = others
    return first
