"""The embedding API: run a fastdecode cluster inside your own Python program.

Async, one stream per request::

    from fastdecode.actors.api import AsyncLLM
    from fastdecode.actors.request import SamplingParams

    async with await AsyncLLM.start("smollm2", num_shards=2) as llm:
        async with contextlib.aclosing(llm.stream("The capital of France is",
                                                  SamplingParams(max_tokens=16, temperature=0))) as outputs:
            async for out in outputs:
                print(out.text, end="", flush=True)

or vLLM's ``AsyncLLM.generate`` shape, results as the tokens come (``await llm.generate(...)`` gives the last)::

        params = SamplingParams(max_tokens=16, output_kind=RequestOutputKind.DELTA)
        async for out in llm.generate("The capital of France is", params, request_id="r1"):
            print(out.outputs[0].text, end="", flush=True)

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
import concurrent.futures.thread  # noqa: F401  (its exit hook registers before ours)
import contextlib
import dataclasses
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
from fastdecode.actors.engine_health import EngineDeadError
from fastdecode.actors.generate_call import GenerateCall
from fastdecode.actors.generation_results import StreamedResult
from fastdecode.actors.logprob_dicts import prompt_logprob_dicts
from fastdecode.actors.prefix_cache import PrefixCacheStats
from fastdecode.actors.request import GenerationResult, RequestOutputKind, SamplingParams
from fastdecode.actors.structured_output import StructuredOutputs

__all__ = ["LLM", "AsyncLLM", "EngineDeadError", "GenerateCall", "RequestOutputKind", "StreamOutput", "StreamedResult",
           "StructuredOutputs", "SubmittedStream", "TokenizedPrompt", "primary_eos_token_id", "prompt_logprob_dicts",
           "token_stop_reason", "run_on"]

CANCEL_WAIT_S = 10.0  # how long an interrupted ``LLM`` call waits for its requests to be cancelled


class LLM:
    """Synchronous front of ``AsyncLLM``: its event loop runs on a background thread.

    ``LLM(ClusterConfig(...))``, or vLLM's ``LLM("smollm2")`` / ``LLM(model="smollm2", num_shards=2,
    max_model_len=2048)``: a model name plus ClusterConfig fields, and those of its ExecutorConfig and
    SchedulerConfig, as keywords. ``close()`` (or ``shutdown()``, or leaving ``with``) stops the cluster and the
    thread; an LLM collected without it is closed then (as vLLM's, through a finalizer), and one still open at
    interpreter exit is closed before the thread pools shut down."""

    def __init__(self, model: str | ClusterConfig | None = None, *, config: ClusterConfig | None = None,
                 **fields) -> None:
        cluster = cluster_config(model, config, **fields)  # a bad argument starts nothing
        # the thread holds the loop, not this LLM: an LLM dropped unclosed is collected, and its finalizer runs
        serving = _LoopThread()
        try:
            llm: AsyncLLM = run_on(serving.loop, AsyncLLM.start(cluster))
        except BaseException:
            serving.end()
            raise
        self._loop, self._llm = serving.loop, llm
        self.tokenizer = llm.tokenizer
        self._finalizer = weakref.finalize(self, _shut_down, serving, llm)
        _close_before_thread_pools_exit(self._finalizer)

    @property
    def is_closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counts now (tokens looked up and found, blocks and bytes held); None where it is off."""
        cache = self._llm.cluster.executor.prefills.cache
        return None if cache is None else dataclasses.replace(cache.stats)

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
        call's other requests are cancelled. With ``SamplingParams(n=...)`` a prompt's result holds its n samples
        in ``outputs`` (see ``AsyncLLM.generate``)."""
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


class _LoopThread:
    """An LLM's event loop and the daemon thread that serves it. It holds the tasks it starts (asyncio keeps only
    weak references to tasks) until they end; the thread holds it, so they live as long as the loop runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task] = set()
        self.thread = threading.Thread(target=self._serve, name="fastdecode-llm", daemon=True)
        self.thread.start()

    @property
    def is_current(self) -> bool:
        return threading.current_thread() is self.thread

    def start_task(self, coro) -> asyncio.Task:
        """On the loop's thread: ``coro`` as a task, held until done."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _serve(self) -> None:
        """Serve the loop until stopped, then join its worker threads and close it."""
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def end(self) -> None:
        """Stop the loop and (off its thread) wait for the thread to end."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)  # runs once run_forever has started
            if not self.is_current:
                self.thread.join()


def _shut_down(serving: _LoopThread, llm: AsyncLLM) -> None:
    """An LLM's close(), run at most once: by close(), when the LLM is collected, or at interpreter exit."""
    if serving.is_current:  # collected on its own loop's thread: stop there, then end it
        serving.start_task(llm.stop()).add_done_callback(lambda _: serving.loop.stop())
        return
    try:
        if serving.thread.is_alive():
            run_on(serving.loop, llm.stop())
    finally:
        serving.end()


def _close_before_thread_pools_exit(finalizer: weakref.finalize) -> None:
    """Run an LLM's finalizer at interpreter exit before concurrent.futures shuts every thread pool down (its
    exit hook, registered through ``threading._register_atexit`` when concurrent.futures.thread was imported,
    above; these hooks run last-registered first, and all before weakref's atexit finalizers).
    Stopping the cluster needs those pools (the dense thread, the loop's default executor). An LLM made while
    the interpreter already exits keeps weakref's atexit hook alone."""
    with contextlib.suppress(RuntimeError):  # "can't register atexit after shutdown"
        threading._register_atexit(finalizer)  # a closed LLM's finalizer does nothing (and holds nothing)


def _settle(done: concurrent.futures.Future, task: asyncio.Task) -> None:
    """Hand a finished task's outcome to the thread waiting on ``done``."""
    if task.cancelled():
        done.cancel()
    elif task.exception() is not None:
        done.set_exception(task.exception())
    else:
        done.set_result(task.result())
