"""The embedding API: run a fastdecode cluster inside your own Python program.

Async, one stream per request::

    from fastdecode.actors.api import AsyncLLM
    from fastdecode.actors.request import SamplingParams

    async with await AsyncLLM.start("smollm2", num_shards=2) as llm:
        async with contextlib.aclosing(llm.stream("The capital of France is",
                                                  SamplingParams(max_tokens=16, temperature=0))) as outputs:
            async for out in outputs:
                print(out.text, end="", flush=True)

Synchronous, a batch of prompts with a progress bar (vLLM's ``LLM`` shape)::

    llm = LLM("smollm2")  # or LLM(ClusterConfig(...)), or LLM(model=..., num_shards=2, ...)
    results = llm.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=32))
    llm.close()

A prompt is a str, a flat sequence of token ids, or vLLM's ``{"prompt": str}`` /
``{"prompt_token_ids": [...]}``; ``generate`` also takes a list of those, and ``chat`` takes conversations.
``AsyncLLM`` lives in ``async_llm.py``, what the calls take in ``api_inputs.py``; both are re-exported here.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Mapping, Sequence

from tqdm import tqdm

from fastdecode.actors.api_inputs import PromptInput, TokenizedPrompt, as_conversations, cluster_config
from fastdecode.actors.async_llm import (
    AsyncLLM,
    StreamOutput,
    SubmittedStream,
    primary_eos_token_id,
    token_stop_reason,
)
from fastdecode.actors.cluster import ClusterConfig
from fastdecode.actors.request import GenerationResult, SamplingParams

__all__ = ["LLM", "AsyncLLM", "StreamOutput", "SubmittedStream", "TokenizedPrompt", "primary_eos_token_id",
           "token_stop_reason", "run_on"]

CANCEL_WAIT_S = 10.0  # how long an interrupted ``LLM`` call waits for its requests to be cancelled


class LLM:
    """Synchronous front of ``AsyncLLM``: its event loop runs on a background thread.

    ``LLM(ClusterConfig(...))``, or vLLM's ``LLM("smollm2")`` / ``LLM(model="smollm2", num_shards=2,
    max_model_len=2048)``: a model name plus ClusterConfig fields, and those of its ExecutorConfig and
    SchedulerConfig, as keywords. ``close()`` (or ``shutdown()``, or leaving ``with``) stops the cluster and the
    thread; an LLM collected without it is closed then (as vLLM's, through a finalizer)."""

    def __init__(self, model: str | ClusterConfig | None = None, *, config: ClusterConfig | None = None,
                 **fields) -> None:
        cluster = cluster_config(model, config, **fields)  # a bad argument starts nothing
        loop = asyncio.new_event_loop()
        # the thread holds the loop, not this LLM: an LLM dropped unclosed is collected, and its finalizer runs
        thread = threading.Thread(target=_serve_loop, args=(loop,), name="fastdecode-llm", daemon=True)
        thread.start()
        try:
            llm: AsyncLLM = run_on(loop, AsyncLLM.start(cluster))
        except BaseException:
            _end_loop(loop, thread)
            raise
        self._loop, self._thread, self._llm = loop, thread, llm
        self.tokenizer = llm.tokenizer
        self._finalizer = weakref.finalize(self, _shut_down, loop, thread, llm)

    @property
    def is_closed(self) -> bool:
        return not self._finalizer.alive

    def _call(self, coro):
        return run_on(self._loop, coro)

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 show_progress: bool = True, use_tqdm: bool | None = None) -> list[GenerationResult]:
        """All prompts at once (continuous batching), results in prompt order.

        ``prompts``: one prompt (a str, token ids, ``{"prompt": ...}`` or ``{"prompt_token_ids": [...]}``)
        or a list of them. ``params`` (vLLM's ``sampling_params=``): one SamplingParams for all, one per
        prompt, or None for the default. ``use_tqdm`` is vLLM's name for ``show_progress``. Every prompt is
        checked before any is submitted; if one request fails, or the call is interrupted (Ctrl-C), the
        call's other requests are cancelled."""
        if self.is_closed:
            raise RuntimeError("LLM is closed")
        if sampling_params is not None:
            if params is not None:
                raise TypeError("give params or sampling_params, not both")
            params = sampling_params
        batch = self._llm.prepare_batch(prompts, params)
        if use_tqdm is not None:
            show_progress = use_tqdm
        with tqdm(total=len(batch), desc="generating", unit="req", disable=not show_progress) as bar:
            return self._call(self._llm.run_batch(batch, on_result=lambda _: bar.update(1)))

    def chat(self, messages: Sequence[Mapping[str, object]] | Sequence[Sequence[Mapping[str, object]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True, *,
             add_generation_prompt: bool = True,
             chat_template_kwargs: Mapping[str, object] | None = None) -> list[GenerationResult]:
        """vLLM's ``LLM.chat``: one conversation (a list of ``{"role", "content"}`` dicts) or a list of them,
        each through the model's chat template as the server's chat route renders it, then ``generate``.
        A result's ``prompt`` is the rendered template."""
        if self.is_closed:
            raise RuntimeError("LLM is closed")
        prompts = [self._llm.chat_prompt(conversation, add_generation_prompt=add_generation_prompt,
                                         chat_template_kwargs=chat_template_kwargs)
                   for conversation in as_conversations(messages)]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def get_tokenizer(self):
        """vLLM's ``LLM.get_tokenizer()``: the model's tokenizer (``encode``, ``decode``,
        ``apply_chat_template``)."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """See AsyncLLM.get_default_sampling_params."""
        return self._llm.default_params

    def close(self) -> None:
        """Stop the cluster and the loop's thread; a second call does nothing."""
        self._finalizer()

    shutdown = close  # vLLM's name

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_on(loop: asyncio.AbstractEventLoop, coro):
    """Run ``coro`` on ``loop`` (served by another thread) and wait for it. If the wait ends early (Ctrl-C), the
    task is cancelled, with every request it submitted, and waited for (a bounded time) before re-raising."""
    done: concurrent.futures.Future = concurrent.futures.Future()
    tasks: list[asyncio.Task] = []

    def start() -> None:
        task = loop.create_task(coro)
        tasks.append(task)
        task.add_done_callback(lambda t: _settle(done, t))

    loop.call_soon_threadsafe(start)
    try:
        return done.result()
    except BaseException:
        if not done.done():
            loop.call_soon_threadsafe(lambda: tasks[0].cancel())  # runs after start()
            with contextlib.suppress(concurrent.futures.CancelledError, TimeoutError):
                done.exception(timeout=CANCEL_WAIT_S)  # returns once the task ended, however it ended
        raise


def _serve_loop(loop: asyncio.AbstractEventLoop) -> None:
    """An LLM's thread: serve ``loop`` until stopped, then join its worker threads and close it."""
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _end_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)  # runs once run_forever has started
        if threading.current_thread() is not thread:
            thread.join()


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, llm: AsyncLLM) -> None:
    """An LLM's close(), run at most once: by close(), when the LLM is collected, or at interpreter exit."""
    if threading.current_thread() is thread:  # collected on its own loop's thread: stop there, then end it
        loop.create_task(llm.stop()).add_done_callback(lambda _: loop.stop())
        return
    try:
        if thread.is_alive():
            run_on(loop, llm.stop())
    finally:
        _end_loop(loop, thread)


def _settle(done: concurrent.futures.Future, task: asyncio.Task) -> None:
    """Hand a finished task's outcome to the thread waiting on ``done``."""
    if task.cancelled():
        done.cancel()
    elif task.exception() is not None:
        done.set_exception(task.exception())
    else:
        done.set_result(task.result())
