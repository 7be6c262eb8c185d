"""The embedding API: run a fastdecode cluster inside your own Python program.

Async, one stream per request::

    from fastdecode.actors.api import AsyncLLM
    from fastdecode.actors.request import SamplingParams

    async with await AsyncLLM.start(ClusterConfig(model="smollm2", num_shards=2)) as llm:
        async for out in llm.stream("The capital of France is", SamplingParams(max_tokens=16, temperature=0)):
            print(out.text, end="", flush=True)

Synchronous, a batch of prompts with a progress bar::

    llm = LLM(ClusterConfig(model="smollm2"))
    results = llm.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=32))
    llm.close()
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.detokenize import Detokenizer
from fastdecode.actors.request import GenerationResult, RequestError, SamplingParams


@dataclass(frozen=True)
class StreamOutput:
    """One step of a request's stream: a token and the text it completed."""

    request_id: int
    token_id: int  # -1 on a final event that carries no token (abort, error, stop string)
    text: str  # new text since the previous output (may be empty mid-character)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the last output
    error: str | None = None
    is_retryable: bool = False  # an error of the server's state (shutting down, no KV node left): try again


class AsyncLLM:
    """A running cluster with tokenization, detokenization and stop strings."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tokenizer = cluster.tokenizer
        self.model_config = cluster.model.config

    @classmethod
    async def start(cls, config: ClusterConfig | None = None) -> "AsyncLLM":
        return cls(await Cluster.start(config or ClusterConfig()))

    @property
    def max_model_len(self) -> int:
        return self.cluster.executor.max_model_len

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    async def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> AsyncIterator[StreamOutput]:
        """Tokens of one request as they come. Leaving the loop early cancels the
        request and frees its KV."""
        prompt_ids = self.encode(prompt)
        request = self.cluster.submit(prompt_ids, params)
        detokenizer = Detokenizer(self.tokenizer, prompt_ids, stop=params.stop, min_tokens=params.min_tokens)
        try:
            async for event in request:
                if event.finish_reason in ("abort", "error"):
                    yield StreamOutput(event.request_id, -1, detokenizer.finish(), None, (),
                                       event.finish_reason, event.error, event.is_retryable)
                    return
                if event.finish_reason == "stop":
                    # The engine stops only on a stop token id or EOS (stop strings are found here). As in
                    # vLLM without include_stop_str_in_output, the token counts as generated but its text
                    # is left out.
                    yield StreamOutput(event.request_id, event.token_id, detokenizer.finish(), event.logprob,
                                       event.top_logprobs, "stop")
                    return
                text, hit_stop = detokenizer.add(event.token_id)
                if hit_stop:
                    request.cancel(is_stop=True)
                    yield StreamOutput(event.request_id, event.token_id, text, event.logprob,
                                       event.top_logprobs, "stop")
                    return
                if event.finish_reason is not None:
                    text += detokenizer.finish()
                yield StreamOutput(event.request_id, event.token_id, text, event.logprob, event.top_logprobs,
                                   event.finish_reason)
        finally:
            request.cancel()  # no-op once finished; frees the KV of an abandoned stream

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams) -> GenerationResult:
        result = GenerationResult(prompt_token_ids=self.encode(prompt))
        async for out in self.stream(result.prompt_token_ids, params):
            if out.token_id >= 0:
                result.token_ids.append(out.token_id)
                if out.logprob is not None:
                    result.logprobs.append(out.logprob)
            result.text += out.text
            if out.finish_reason == "error":
                raise RequestError(out.error or "generation failed")
            result.finish_reason = out.finish_reason
        return result

    async def stop(self) -> None:
        await self.cluster.stop()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class LLM:
    """Synchronous front of ``AsyncLLM``: its event loop runs on a background thread."""

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fastdecode-llm", daemon=True)
        self._thread.start()
        self._llm: AsyncLLM = self._call(AsyncLLM.start(config))
        self.tokenizer = self._llm.tokenizer

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 *, show_progress: bool = True) -> list[GenerationResult]:
        """All prompts at once (continuous batching), results in prompt order."""
        params = params or SamplingParams()

        async def run_all():
            with tqdm(total=len(prompts), desc="generating", unit="req", disable=not show_progress) as bar:
                async def one(prompt):
                    result = await self._llm.generate(prompt, params)
                    bar.update(1)
                    return result

                return await asyncio.gather(*(one(p) for p in prompts))

        return self._call(run_all())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._llm.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
