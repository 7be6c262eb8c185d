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
``{"prompt_token_ids": [...]}``; ``generate`` also takes a list of those.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import operator
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.detokenize import Detokenizer
from fastdecode.actors.executor_config import check_prompt
from fastdecode.actors.request import GenerationResult, RequestError, SamplingParams

PromptInput = str | Sequence[int] | Mapping[str, object]  # text, token ids, or vLLM's TextPrompt/TokensPrompt
PROMPT_KEYS = ("prompt", "prompt_token_ids")
CANCEL_WAIT_S = 10.0  # how long an interrupted ``LLM`` call waits for its requests to be cancelled


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
    # vLLM's stop_reason, on a "stop" output: the stop string or stop token id that ended the request; None for
    # the tokenizer's EOS (a generation_config EOS id other than that one counts as a stop token id, as in vLLM)
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class TokenizedPrompt:
    """One prompt as token ids, and its text where it was given as text."""

    token_ids: list[int]
    text: str | None = None


def cluster_config(model: str | ClusterConfig | None = None, config: ClusterConfig | None = None,
                   **fields) -> ClusterConfig:
    """What ``LLM(...)``/``AsyncLLM.start(...)`` start: a ClusterConfig, or a model name (vLLM's
    ``LLM(model=...)``), and ClusterConfig fields as keywords, which override the config's."""
    if isinstance(model, ClusterConfig):
        if config is not None:
            raise TypeError("give the ClusterConfig once (as the first argument or as config=)")
        model, config = None, model
    if model is not None:
        if not isinstance(model, str):
            raise TypeError(f"model must be a model name or a ClusterConfig, got {type(model).__name__}")
        fields["model"] = model
    if config is not None and not isinstance(config, ClusterConfig):
        raise TypeError(f"config must be a ClusterConfig, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(unknown)}: the keywords are ClusterConfig's fields "
                        f"({', '.join(sorted(known))})")
    return dataclasses.replace(config, **fields) if config is not None else ClusterConfig(**fields)


def check_params(params: SamplingParams | None, name: str = "params",
                 default: SamplingParams | None = None) -> SamplingParams:
    """``params`` itself; None is ``default`` (the model's, see AsyncLLM.get_default_sampling_params), else
    SamplingParams()."""
    if params is None:
        return default if default is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"{name} must be a SamplingParams (or None), got {type(params).__name__}")
    return params


def params_per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int,
                      name: str = "params", default: SamplingParams | None = None) -> list[SamplingParams]:
    """One SamplingParams for every prompt, or one per prompt (vLLM's ``Sequence[SamplingParams]``); None is
    ``default``."""
    if params is None or isinstance(params, SamplingParams):
        return [check_params(params, name, default)] * num_prompts
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Sequence):
        raise TypeError(f"{name} must be a SamplingParams or a list of them, got {type(params).__name__}")
    if len(params) != num_prompts:
        raise ValueError(f"{name} has {len(params)} SamplingParams for {num_prompts} prompt(s): give one, "
                         "or one per prompt")
    return [check_params(p, name, default) for p in params]


def as_batch(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    """The prompts of a ``generate`` call: a str, a dict or a flat list of ints is one prompt."""
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a prompt (a str, token ids, or a dict with 'prompt' or "
                        f"'prompt_token_ids') or a list of them, got {type(prompts).__name__}")
    items = list(prompts)
    if items and _is_token_id(items[0]):
        return [items]
    return items


def _is_token_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def primary_eos_token_id(tokenizer: object) -> int | None:
    """The tokenizer's own EOS id (vLLM's ``tokenizer.eos_token_id``), or None when it names no EOS token."""
    eos_token = getattr(tokenizer, "eos_token", None)
    backend = getattr(tokenizer, "backend", None)
    return None if eos_token is None or backend is None else backend.token_to_id(eos_token)


def token_stop_reason(token_id: int, params: SamplingParams, eos_token_id: int | None) -> int | None:
    """The stop_reason of a request the engine stopped on ``token_id`` (a stop token id or an EOS id): None for
    the primary EOS ``eos_token_id`` (unless ignore_eos), else the token id. vLLM checks the primary EOS first
    and adds the generation_config's other EOS ids to the stop token ids, which report themselves."""
    if not params.ignore_eos and token_id == eos_token_id:
        return None
    return token_id


def _token_ids(value: object, name: str) -> list[int]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(value).__name__}")
    bad = next((t for t in value if not _is_token_id(t)), None)
    if bad is not None:
        raise TypeError(f"{name} must be integers, got {bad!r}")
    return [operator.index(t) for t in value]


class SubmittedStream:
    """The outputs of a request already submitted (AsyncLLM.submit). Unlike an async generator never started,
    ``aclose()`` cancels the request even if nothing was read."""

    def __init__(self, request, outputs: AsyncGenerator[StreamOutput, None]) -> None:
        self._request = request
        self._outputs = outputs

    def __aiter__(self) -> "SubmittedStream":
        return self

    async def __anext__(self) -> StreamOutput:
        return await self._outputs.__anext__()

    async def aclose(self) -> None:
        self._request.cancel()
        await self._outputs.aclose()


class AsyncLLM:
    """A running cluster with tokenization, detokenization and stop strings."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tokenizer = cluster.tokenizer
        self.model_config = cluster.model.config
        self.eos_token_id = primary_eos_token_id(self.tokenizer)
        self.default_params = self.get_default_sampling_params()
        self.is_closed = False

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without SamplingParams runs with (vLLM's ``LLM.get_default_sampling_params``): the
        model's generation_config.json values (its max_new_tokens as max_tokens) over SamplingParams()."""
        defaults = self.model_config.sampling_defaults
        fields = defaults.sampling_fields()
        if defaults.max_tokens is not None:
            fields["max_tokens"] = defaults.max_tokens
        return SamplingParams(**fields)

    @classmethod
    async def start(cls, model: str | ClusterConfig | None = None, *, config: ClusterConfig | None = None,
                    **fields) -> "AsyncLLM":
        """Start a cluster: ``start(ClusterConfig(...))``, or ``start("smollm2", num_shards=2, ...)``."""
        return cls(await Cluster.start(cluster_config(model, config, **fields)))

    @property
    def max_model_len(self) -> int:
        return self.cluster.executor.max_model_len

    @property
    def max_num_choices(self) -> int:
        """The most engine requests one call may submit together: every one waits at first, so the queue's
        length (those past what runs at once wait their turn, as in vLLM)."""
        return max(1, self.cluster.executor.config.max_queue)

    def tokenize(self, prompt: PromptInput | TokenizedPrompt) -> TokenizedPrompt:
        """One prompt as token ids; TypeError (naming ``prompt``) for what is not a prompt."""
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        if isinstance(prompt, str):
            return TokenizedPrompt(self.tokenizer.encode(prompt), prompt)
        if not isinstance(prompt, Mapping):
            return TokenizedPrompt(_token_ids(prompt, "prompt token ids"))
        unknown = sorted(str(k) for k in prompt if k not in PROMPT_KEYS)
        text = prompt.get("prompt")
        if unknown or not any(k in prompt for k in PROMPT_KEYS):
            keys = sorted(map(str, prompt))
            raise TypeError(f"a prompt dict takes 'prompt' (text) or 'prompt_token_ids', got keys {keys}")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"the prompt dict's 'prompt' must be a str, got {type(text).__name__}")
        if "prompt_token_ids" in prompt:  # vLLM's TokensPrompt: the ids are what runs, the text is kept
            return TokenizedPrompt(_token_ids(prompt["prompt_token_ids"], "prompt_token_ids"), text)
        return TokenizedPrompt(self.tokenizer.encode(text), text)

    def encode(self, prompt: PromptInput) -> list[int]:
        return self.tokenize(prompt).token_ids

    def check_prompt(self, prompt: TokenizedPrompt) -> None:
        """RequestError if the Executor would refuse the prompt (empty, unknown ids, too long)."""
        check_prompt(prompt.token_ids, self.model_config.vocab_size, self.max_model_len)

    def check_open(self) -> None:
        if self.is_closed:
            raise RuntimeError("LLM is closed")

    def stream(self, prompt: PromptInput | TokenizedPrompt,
               params: SamplingParams | None = None) -> AsyncGenerator[StreamOutput, None]:
        """Tokens of one request as they come. The arguments are checked now; the request is submitted
        when iteration starts. Leaving the loop early cancels the request and frees its KV once the
        generator is closed: at once for an inline ``async for``, otherwise use
        ``contextlib.aclosing(llm.stream(...))`` (or ``await gen.aclose()``)."""
        self.check_open()
        return self._stream(self.tokenize(prompt).token_ids, check_params(params, default=self.default_params))

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> "SubmittedStream":
        """Submit now (refusals raise here: QueueFullError, UnavailableError, RequestError) and return the
        request's outputs, which ``aclose()`` cancels whether or not they were read."""
        self.check_open()
        params = check_params(params, default=self.default_params)
        request = self.cluster.submit(prompt_ids, params)
        return SubmittedStream(request, self._stream(prompt_ids, params, request))

    async def _stream(self, prompt_ids: list[int], params: SamplingParams,
                      request=None) -> AsyncGenerator[StreamOutput, None]:
        if request is None:
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
                                       event.top_logprobs, "stop",
                                       stop_reason=token_stop_reason(event.token_id, params, self.eos_token_id))
                    return
                text, hit_stop = detokenizer.add(event.token_id)
                if hit_stop:
                    request.cancel(is_stop=True)
                    yield StreamOutput(event.request_id, event.token_id, text, event.logprob,
                                       event.top_logprobs, "stop", stop_reason=detokenizer.stop_string)
                    return
                if event.finish_reason is not None:
                    text += detokenizer.finish()
                yield StreamOutput(event.request_id, event.token_id, text, event.logprob, event.top_logprobs,
                                   event.finish_reason)
        finally:
            request.cancel()  # no-op once finished; frees the KV of an abandoned stream

    async def generate(self, prompt: PromptInput | TokenizedPrompt,
                       params: SamplingParams | None = None) -> GenerationResult:
        """One request to its end; RequestError if it failed."""
        self.check_open()
        tokenized = self.tokenize(prompt)
        params = check_params(params, default=self.default_params)
        result = GenerationResult(prompt_token_ids=tokenized.token_ids, prompt=tokenized.text)
        async with contextlib.aclosing(self._stream(tokenized.token_ids, params)) as outputs:
            async for out in outputs:
                if out.token_id >= 0:
                    result.token_ids.append(out.token_id)
                    if out.logprob is not None:
                        result.logprobs.append(out.logprob)
                result.text += out.text
                if out.finish_reason == "error":
                    raise RequestError(out.error or "generation failed")
                result.finish_reason = out.finish_reason
                result.stop_reason = out.stop_reason
        return result

    def prepare_batch(self, prompts: PromptInput | Sequence[PromptInput],
                      params: SamplingParams | Sequence[SamplingParams] | None = None,
                      ) -> list[tuple[TokenizedPrompt, SamplingParams]]:
        """Tokenize and check a batch before any of it is submitted (TypeError, ValueError, RequestError)."""
        self.check_open()
        batch = [self.tokenize(p) for p in as_batch(prompts)]
        per_prompt = params_per_prompt(params, len(batch), default=self.default_params)
        for i, prompt in enumerate(batch):
            try:
                self.check_prompt(prompt)
            except RequestError as exc:
                raise RequestError(f"prompt {i}: {exc}", "prompt") from None
        return list(zip(batch, per_prompt))

    async def run_batch(self, batch: Sequence[tuple[TokenizedPrompt, SamplingParams]], *,
                        on_result: Callable[[GenerationResult], None] | None = None) -> list[GenerationResult]:
        """All of a prepared batch at once (continuous batching), results in prompt order. If one fails,
        or this is cancelled, every other request of the batch is cancelled before this returns."""
        async def one(prompt: TokenizedPrompt, params: SamplingParams) -> GenerationResult:
            result = await self.generate(prompt, params)
            if on_result is not None:
                on_result(result)
            return result

        tasks = [asyncio.ensure_future(one(prompt, params)) for prompt, params in batch]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def stop(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            await self.cluster.stop()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class LLM:
    """Synchronous front of ``AsyncLLM``: its event loop runs on a background thread.

    ``LLM(ClusterConfig(...))``, or vLLM's ``LLM("smollm2")`` / ``LLM(model="smollm2", num_shards=2)``:
    a model name plus ClusterConfig fields as keywords."""

    def __init__(self, model: str | ClusterConfig | None = None, *, config: ClusterConfig | None = None,
                 **fields) -> None:
        cluster = cluster_config(model, config, **fields)  # a bad argument starts nothing
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fastdecode-llm", daemon=True)
        self._thread.start()
        try:
            self._llm: AsyncLLM = self._call(AsyncLLM.start(cluster))
        except BaseException:
            self._stop_loop()
            raise
        self.tokenizer = self._llm.tokenizer

    @property
    def is_closed(self) -> bool:
        return self._loop.is_closed()

    def _call(self, coro):
        """Run ``coro`` on the loop's thread and wait for it. If the wait ends early (Ctrl-C), the task is
        cancelled, with every request it submitted, and waited for (a bounded time) before re-raising."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        tasks: list[asyncio.Task] = []

        def start() -> None:
            task = self._loop.create_task(coro)
            tasks.append(task)
            task.add_done_callback(lambda t: _settle(done, t))

        self._loop.call_soon_threadsafe(start)
        try:
            return done.result()
        except BaseException:
            if not done.done():
                self._loop.call_soon_threadsafe(lambda: tasks[0].cancel())  # runs after start()
                with contextlib.suppress(concurrent.futures.CancelledError, TimeoutError):
                    done.exception(timeout=CANCEL_WAIT_S)  # returns once the task ended, however it ended
            raise

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

    def get_default_sampling_params(self) -> SamplingParams:
        """See AsyncLLM.get_default_sampling_params."""
        return self._llm.default_params

    def close(self) -> None:
        if self.is_closed:
            return
        try:
            if self._thread.is_alive():
                self._call(self._llm.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)  # runs once run_forever has started
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _settle(done: concurrent.futures.Future, task: asyncio.Task) -> None:
    """Hand a finished task's outcome to the thread waiting on ``done``."""
    if task.cancelled():
        done.cancel()
    elif task.exception() is not None:
        done.set_exception(task.exception())
    else:
        done.set_result(task.result())
