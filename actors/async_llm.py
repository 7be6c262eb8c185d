"""The asynchronous embedding API: ``AsyncLLM``, a running cluster with tokenization, detokenization and stop
strings, and the stream of outputs of each request (``stream_outputs``; ``fastdecode.actors.api`` re-exports them)."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence

from fastdecode.actors.api_inputs import (
    PROMPT_KEYS,
    PromptInput,
    TokenizedPrompt,
    as_batch,
    check_params,
    cluster_config,
    params_per_prompt,
    token_ids,
)
from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.detokenize import Detokenizer
from fastdecode.actors.engine_health import EngineDeadError, EngineHealth
from fastdecode.actors.executor_config import check_prompt
from fastdecode.actors.generate_call import GenerateCall
from fastdecode.actors.generation_results import final_result, stream_results
from fastdecode.actors.named_requests import NamedRequest, NamedRequests
from fastdecode.actors.request import GenerationResult, RequestError, RequestOutputKind, SamplingParams
from fastdecode.actors.stream_outputs import StreamOutput, SubmittedStream
from fastdecode.actors.unclosed import release_unstopped


def max_text_chars(max_model_len: int, max_chars_per_token: int) -> int:
    """The most characters of text ``max_model_len`` tokens of at most ``max_chars_per_token`` each hold: text
    longer has more tokens than the context holds (``AsyncLLM.max_prompt_chars``, ``check_text_fits``)."""
    return max_model_len * max_chars_per_token


def check_text_fits(num_chars: int, max_model_len: int, max_chars_per_token: int, param: str = "prompt") -> None:
    """RequestError (naming ``param``) for text of more characters than ``max_model_len`` tokens of at most
    ``max_chars_per_token`` each hold (``max_text_chars``): the refusal its token count would give, without the
    seconds of tokenizing it. (A chat template that drops message text could have made it fit; that is text the
    model never sees.)"""
    max_chars = max_text_chars(max_model_len, max_chars_per_token)
    if num_chars > max_chars:
        text = "the prompt" if param == "prompt" else "the text of the messages"
        raise RequestError(f"{text} is too long for this model's context: {num_chars} characters, more than its "
                           f"{max_model_len} tokens can hold (at most {max_chars})", param)


def primary_eos_token_id(tokenizer: object) -> int | None:
    """The tokenizer's own EOS id (vLLM's ``tokenizer.eos_token_id``), or None when it names no EOS token."""
    eos_token = getattr(tokenizer, "eos_token", None)
    backend = getattr(tokenizer, "backend", None)
    return None if eos_token is None or backend is None else backend.token_to_id(eos_token)


def token_stop_reason(token_id: int, params: SamplingParams, eos_token_id: int | None) -> int | None:
    """The stop_reason of a request the engine stopped on ``token_id`` (a stop token id or an EOS id): None for
    the primary EOS ``eos_token_id`` (unless ignore_eos), else the token id. vLLM checks the primary EOS first
    and adds the generation_config's other EOS ids to the stop token ids, which report themselves. A structured
    output ends on EOS when its grammar is complete, ignore_eos or not: None too."""
    if (not params.ignore_eos or params.structured_outputs is not None) and token_id == eos_token_id:
        return None
    return token_id


class AsyncLLM:
    """A running cluster with tokenization, detokenization and stop strings.

    It lives on the event loop it was made on (``loop``): its calls from another thread's loop raise
    RuntimeError (run them there with ``asyncio.run_coroutine_threadsafe(coro, llm.loop)``). One collected
    without ``stop()`` warns (ResourceWarning) and stops its cluster on its loop if that still runs."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tokenizer = cluster.tokenizer
        self.model_config = cluster.model.config
        self.eos_token_id = primary_eos_token_id(self.tokenizer)
        self.default_params = self.get_default_sampling_params()
        self.is_closed = False
        self._loop = _running_loop()  # None until the first call made on a loop
        self._stop_task: asyncio.Task | None = None
        self.named_requests = NamedRequests()  # the live requests named by their callers (vLLM's request_id)
        self._health = EngineHealth(cluster.executor)  # whether its step loop runs (is_running, errored)
        self._finalizer = weakref.finalize(self, release_unstopped, self._loop, cluster)

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without SamplingParams runs with (vLLM's ``LLM.get_default_sampling_params``): the
        model's generation_config.json values (its max_new_tokens as max_tokens) over SamplingParams()."""
        defaults = self.model_config.sampling_defaults
        fields = defaults.sampling_fields()
        if defaults.max_tokens is not None:
            fields["max_tokens"] = defaults.max_tokens
        return SamplingParams(**fields)

    async def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the structured outputs of ``params`` (if any) on a worker thread, where a large schema does not
        hold up the engine's loop; the submission finds it compiled. RequestError if it cannot be compiled."""
        if params.structured_outputs is not None and self.cluster.executor.grammars is not None:
            await asyncio.to_thread(self.cluster.executor.grammars.compile, params.structured_outputs)

    async def get_tokenizer(self):
        """vLLM's ``await engine.get_tokenizer()``: the model's Tokenizer (``encode``, ``decode``, chat templates)."""
        return self.tokenizer

    @classmethod
    async def start(cls, model: str | ClusterConfig | None = None, *, config: ClusterConfig | None = None,
                    **fields) -> "AsyncLLM":
        """Start a cluster: ``start(ClusterConfig(...))``, or ``start("smollm2", num_shards=2, ...)``."""
        return cls(await Cluster.start(cluster_config(model, config, **fields)))

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this AsyncLLM and its cluster run on."""
        return self._loop

    def check_loop(self, *, is_loop_needed: bool = True) -> None:
        """RuntimeError unless called on this AsyncLLM's event loop (a stream bound to it would never wake up
        elsewhere); without ``is_loop_needed``, a call outside any loop passes too."""
        running = _running_loop()
        if self._loop is None and running is not None:
            self._loop = running
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, release_unstopped, running, self.cluster)
        if running is self._loop or (running is None and not is_loop_needed):
            return
        where = "from another event loop" if running is not None else "outside any running event loop"
        raise RuntimeError(f"this AsyncLLM runs on the event loop it was started on, and was called {where} "
                           f"(thread {threading.current_thread().name!r}): run the call on its loop, e.g. "
                           "asyncio.run_coroutine_threadsafe(coro, llm.loop).result() from another thread")

    @property
    def max_model_len(self) -> int:
        return self.cluster.executor.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        """No token stands for more than the tokenizer's ``max_chars_per_token`` characters: text longer than this has
        more tokens than the context holds, refused without the seconds of tokenizing it."""
        return max_text_chars(self.max_model_len, self.tokenizer.max_chars_per_token)


    @property
    def max_num_choices(self) -> int:
        """The most engine requests one call may submit together: every one waits at first, so the queue's
        length (those past what runs at once wait their turn, as in vLLM)."""
        return self.cluster.executor.config.max_queue

    @property
    def max_logprobs(self) -> int:
        """The most top logprobs a request may ask per token (vLLM's max_logprobs; -1: the whole vocabulary)."""
        return self.cluster.executor.config.max_logprobs

    def tokenize(self, prompt: PromptInput | TokenizedPrompt, params: SamplingParams | None = None) -> TokenizedPrompt:
        """One prompt as token ids, cut to the ``truncate_prompt_tokens`` of ``params`` where given (its text kept as
        given, as vLLM's); TypeError (naming ``prompt``) for what is not a prompt."""
        if isinstance(prompt, TokenizedPrompt):
            tokenized = prompt
        elif isinstance(prompt, str):
            tokenized = TokenizedPrompt(self.tokenizer.encode(prompt), prompt)
        elif not isinstance(prompt, Mapping):
            tokenized = TokenizedPrompt(token_ids(prompt, "prompt token ids"))
        else:
            unknown = sorted(str(k) for k in prompt if k not in PROMPT_KEYS)
            text = prompt.get("prompt")
            if unknown or not any(k in prompt for k in PROMPT_KEYS):
                keys = sorted(map(str, prompt))
                raise TypeError(f"a prompt dict takes 'prompt' (text) or 'prompt_token_ids', got keys {keys}")
            if text is not None and not isinstance(text, str):
                raise TypeError(f"the prompt dict's 'prompt' must be a str, got {type(text).__name__}")
            if "prompt_token_ids" in prompt:  # vLLM's TokensPrompt: the ids are what runs, the text is kept
                tokenized = TokenizedPrompt(token_ids(prompt["prompt_token_ids"], "prompt_token_ids"), text)
            else:
                tokenized = TokenizedPrompt(self.tokenizer.encode(text), text)
        if params is None or params.truncate_prompt_tokens is None:
            return tokenized
        return TokenizedPrompt(params.truncated_prompt(tokenized.token_ids, self.max_model_len), tokenized.text)

    def encode(self, prompt: PromptInput) -> list[int]:
        return self.tokenize(prompt).token_ids

    def check_prompt(self, prompt: TokenizedPrompt, params: SamplingParams | None = None) -> None:
        """RequestError if the Executor would refuse the prompt (empty, unknown ids, too long once cut to the
        ``truncate_prompt_tokens`` of ``params``) or ``params`` (token ids outside the vocabulary, bad_words of no
        token)."""
        prompt_ids = prompt.token_ids
        if params is not None:
            prompt_ids, params = self._for_submission(prompt_ids, params)
        check_prompt(prompt_ids, self.model_config.vocab_size, self.max_model_len, params,
                     self.cluster.executor.eos_token_ids, self.max_logprobs)

    def check_open(self) -> None:
        """RuntimeError once closed; ``dead_error`` once the engine died (a request would never run)."""
        if self.is_closed:
            raise RuntimeError("LLM is closed")
        if self.errored:
            raise self.dead_error

    @property
    def is_running(self) -> bool:
        """vLLM's: the engine's step loop runs, and no stop has begun."""
        return not self.is_closed and self._health.is_running

    @property
    def is_stopped(self) -> bool:
        """vLLM's: the engine serves no more, stopped (``stop()``, ``shutdown()``) or dead (``errored``)."""
        return not self.is_running

    @property
    def errored(self) -> bool:
        """vLLM's: the engine died, its step loop ended without a stop (``EngineHealth``); a stop is not an error."""
        return self._health.errored

    @property
    def dead_error(self) -> EngineDeadError:
        """vLLM's: the EngineDeadError of this engine, saying why it does not run (its ``__cause__`` what killed it)."""
        return self._health.dead_error(is_closed=self.is_closed)

    async def check_health(self) -> None:
        """vLLM's: raise ``dead_error`` unless the engine runs (dead, or stopped)."""
        if not self.is_running:
            raise self.dead_error

    def chat_prompt(self, conversation: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True,
                    chat_template_kwargs: Mapping[str, object] | None = None) -> TokenizedPrompt:
        """One conversation as the server's chat route makes its prompt: its messages checked by the same
        parser (RequestError naming the bad one), then the model's chat template (``Tokenizer.encode_chat``,
        no special tokens added: the template writes them). The prompt's text is the rendered template."""
        from fastdecode.actors.frontend.errors import ApiError
        from fastdecode.actors.frontend.openai_request import parse_messages

        try:
            messages = [dict(m) for m in parse_messages(list(conversation))]
        except ApiError as exc:
            raise RequestError(exc.message, exc.param) from None
        kwargs = dict(chat_template_kwargs or {})
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return TokenizedPrompt(ids, text)

    def stream(self, prompt: PromptInput | TokenizedPrompt, params: SamplingParams | None = None,
               request_id: str | None = None) -> AsyncGenerator[StreamOutput, None]:
        """Tokens of one request as they come. The arguments are checked now; a text prompt is tokenized when
        iteration starts, off the loop (text past ``max_prompt_chars`` refused untokenized), and the request is
        submitted then. Leaving the loop early cancels the request and frees its KV once the
        generator is closed: at once for an inline ``async for``, otherwise use
        ``contextlib.aclosing(llm.stream(...))`` (or ``await gen.aclose()``). ``request_id`` (vLLM's) names the
        request: its outputs carry it and ``abort(request_id)`` ends it; ValueError while a live request has it.
        A stream is one sample: ``params.n`` > 1 is a RequestError (``generate`` returns n samples)."""
        self.check_open()
        self.check_loop(is_loop_needed=False)  # the generator may be made outside a loop, to iterate on ours
        params = check_params(params, default=self.default_params)
        if params.n != 1:
            raise RequestError(f"a stream yields one sample's tokens, and n={params.n} asks for more: use generate "
                               "for n samples, or one stream per sample (SamplingParams.samples())", "n")
        self.named_requests.check_free(request_id)  # checked again when it starts (NamedRequests.hold)
        if self._text_to_tokenize(prompt) is None:
            prompt = self.tokenize(prompt)
            if request_id is None:
                return self._stream(prompt.token_ids, params)
        return self._stream_prompt(prompt, params, request_id)

    async def _stream_prompt(self, prompt: PromptInput | TokenizedPrompt, params: SamplingParams,
                             request_id: str | None) -> AsyncGenerator[StreamOutput, None]:
        """``stream`` of a text prompt, tokenized when iteration starts, off the loop (``_tokenize_off_loop``), or
        of a named request, its name held from then until the stream ends (``NamedRequests.hold``)."""
        with self.named_requests.hold(request_id) as named:
            tokenized = await self._tokenize_off_loop(prompt, params)
            async with contextlib.aclosing(self._stream(tokenized.token_ids, params, named=named)) as outputs:
                async for out in outputs:
                    yield out

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> "SubmittedStream":
        """Submit now (refusals raise here: QueueFullError, UnavailableError, RequestError) and return the
        request's outputs, which ``aclose()`` cancels whether or not they were read. One sample: ``params.n`` > 1
        is a RequestError (the engine's, ``SamplingParams.within``)."""
        self.check_open()
        self.check_loop()
        prompt_ids, params = self._for_submission(prompt_ids, check_params(params, default=self.default_params))
        request = self.cluster.submit(prompt_ids, params)
        return SubmittedStream(request, self._stream(prompt_ids, params, request))

    def _for_submission(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """What the Executor takes: the prompt cut to the ``truncate_prompt_tokens`` of ``params``, and ``params``
        with their bad words tokenized (once: samples made after it share them)."""
        params = params.with_bad_words_token_ids(self.tokenizer)
        return params.truncated_prompt(prompt_ids, self.max_model_len), params

    async def _stream(self, prompt_ids: list[int], params: SamplingParams, request=None,
                      named: NamedRequest | None = None) -> AsyncGenerator[StreamOutput, None]:
        if request is None:  # stream() and generate(): submitted now, when iteration starts
            self.check_open()
            self.check_loop()
            await self.compile_structured_outputs(params)
            if named is not None and named.is_aborted:  # aborted while its prompt was tokenized: never submitted
                yield StreamOutput(named.request_id, -1, "", finish_reason="abort")
                return
            prompt_ids, params = self._for_submission(prompt_ids, params)
            request = self.cluster.submit(prompt_ids, params)
            if named is not None:
                named.seq_ids.append(request.request_id)  # abort(name) ends it from here on
        detokenizer = Detokenizer.for_params(self.tokenizer, prompt_ids, params)
        output_id = request.request_id if named is None else named.request_id
        try:
            async for event in request:
                made_at = event.made_at
                if event.finish_reason in ("abort", "error"):
                    yield StreamOutput(output_id, -1, detokenizer.finish(), None, (),
                                       event.finish_reason, event.error, event.is_retryable,
                                       prompt_logprobs=event.prompt_logprobs, made_at=made_at)
                    return
                if event.finish_reason == "stop":
                    # The engine stops only on a stop token id or EOS (stop strings are found here). As in vLLM, the
                    # token counts as generated; its text is left out unless include_stop_str_in_output, when a stop
                    # string it completes is the stop_reason.
                    text = detokenizer.finish(event.token_id)
                    stop_reason = detokenizer.stop_string or token_stop_reason(event.token_id, params,
                                                                                self.eos_token_id)
                    yield StreamOutput(output_id, event.token_id, text, event.logprob, event.top_logprobs, "stop",
                                       stop_reason=stop_reason, prompt_logprobs=event.prompt_logprobs,
                                       made_at=made_at, rank=event.rank)
                    return
                text, hit_stop = detokenizer.add(event.token_id)
                if hit_stop:
                    request.cancel(is_stop=True)
                    yield StreamOutput(output_id, event.token_id, text, event.logprob,
                                       event.top_logprobs, "stop", stop_reason=detokenizer.stop_string,
                                       prompt_logprobs=event.prompt_logprobs, made_at=made_at, rank=event.rank)
                    return
                if event.finish_reason is not None:
                    text += detokenizer.finish()
                yield StreamOutput(output_id, event.token_id, text, event.logprob, event.top_logprobs,
                                   event.finish_reason, prompt_logprobs=event.prompt_logprobs, made_at=made_at,
                                   rank=event.rank)
        finally:
            request.cancel()  # no-op once finished; frees the KV of an abandoned stream

    def generate(self, prompt: PromptInput | TokenizedPrompt, params: SamplingParams | None = None,
                 request_id: str | None = None) -> GenerateCall:
        """One request: ``await`` it for its final result, or iterate it (``async for``) as vLLM's generator of
        results as the tokens come, per ``params.output_kind`` (``stream_results``: CUMULATIVE, everything so far;
        DELTA, what is new; FINAL_ONLY, the final result alone; a result's ``finished`` is True on the last). The
        arguments are checked now; the request starts when awaited or iterated. RequestError if it failed (raised
        out of the iteration). ``request_id`` as in ``stream``: a request ended by ``abort(request_id)`` ends with
        finish_reason "abort", what it made kept. ``params.n`` > 1 (vLLM's parallel sampling): its n samples run
        together, each its own engine request (``SamplingParams.samples``: sample i seeded seed + i; the prompt's
        logprobs asked of sample 0 alone, as vLLM's ``RequestOutput`` has them once), awaited one result of n
        ``outputs``, iterated one result per output of a sample (that sample's, its ``index``); a refusal of one
        cancels the others, and an abort of its name ends them all."""
        self.check_open()
        params = check_params(params, default=self.default_params)
        self.check_num_samples(params)
        self.named_requests.check_free(request_id)  # checked again when it starts (NamedRequests.hold)
        return GenerateCall(self._generate(prompt, params, request_id),
                            functools.partial(self._results, prompt, params, request_id, params.output_kind))

    async def _generate(self, prompt: PromptInput | TokenizedPrompt, params: SamplingParams,
                        request_id: str | None) -> GenerationResult:
        """``generate`` awaited: its final result (FINAL_ONLY's one)."""
        return await final_result(self._results(prompt, params, request_id, RequestOutputKind.FINAL_ONLY))

    async def _results(self, prompt: PromptInput | TokenizedPrompt, params: SamplingParams, request_id: str | None,
                       kind: RequestOutputKind) -> AsyncGenerator[GenerationResult, None]:
        """``generate``'s results of ``kind``, its name held from when it starts until they end."""
        self.check_open()
        self.check_loop()
        with self.named_requests.hold(request_id) as named:  # abort(request_id) ends it from here on
            tokenized = await self._tokenize_off_loop(prompt, params)
            samples = params.with_bad_words_token_ids(self.tokenizer).samples(is_prompt_logprobs_once=True)
            streams = [self._stream(tokenized.token_ids, sample, named=named) for sample in samples]
            async with contextlib.aclosing(stream_results(streams, tokenized, samples, self.tokenizer.token_text,
                                                          kind)) as results:
                async for result in results:
                    yield result

    def check_num_samples(self, params: SamplingParams) -> None:
        """RequestError (param ``n``) for more samples than the queue holds: all of a request's are submitted
        together, so they could never be admitted (the server's 400 for prompts x n past ``--max-queue``)."""
        if params.n > self.max_num_choices:
            raise RequestError(f"n={params.n} samples are more than this engine queues at once "
                               f"({self.max_num_choices}, its max_queue)", "n")

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """vLLM's ``AsyncLLM.abort``: end the live requests of these ids, in the engine as closing their streams
        does (``Executor.abort``), but their streams read on to the engine's end, an output of finish_reason
        "abort". An id no live request has (unknown, finished) is passed over."""
        self.check_loop()
        for seq_id in self.named_requests.abort(request_id):  # every sample of an n > 1 request
            self.cluster.executor.abort(seq_id)

    @staticmethod
    def _text_to_tokenize(prompt: PromptInput | TokenizedPrompt) -> str | None:
        """The text ``tokenize`` would encode for ``prompt``; None where it runs given ids (or refuses the prompt)."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, Mapping) and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"]
        return None

    async def _tokenize_off_loop(self, prompt: PromptInput | TokenizedPrompt,
                                 params: SamplingParams | None = None) -> TokenizedPrompt:
        """``tokenize`` on a worker thread where there is text to tokenize (this loop runs the Executor and the
        in-process shards), text past ``max_prompt_chars`` refused first unless ``params`` truncate the prompt (as
        vLLM: its tokens are cut to what fits)."""
        text = self._text_to_tokenize(prompt)
        is_truncated = params is not None and params.truncate_prompt_tokens is not None
        args = (prompt, params) if is_truncated else (prompt,)  # tokenize uses params for that alone
        if text is None:
            return self.tokenize(*args)
        if not is_truncated:
            check_text_fits(len(text), self.max_model_len, self.tokenizer.max_chars_per_token)
        return await asyncio.to_thread(self.tokenize, *args)

    def prepare_batch(self, prompts: PromptInput | Sequence[PromptInput],
                      params: SamplingParams | Sequence[SamplingParams] | None = None,
                      ) -> list[tuple[TokenizedPrompt, SamplingParams]]:
        """Tokenize and check a batch before any of it is submitted (TypeError, ValueError, RequestError)."""
        self.check_open()
        batch = [self.tokenize(p) for p in as_batch(prompts)]
        per_prompt = params_per_prompt(params, len(batch), default=self.default_params)
        for i, (prompt, prompt_params) in enumerate(zip(batch, per_prompt)):
            try:
                self.check_prompt(prompt, prompt_params)
                self.check_num_samples(prompt_params)
            except RequestError as exc:
                raise RequestError(f"prompt {i}: {exc}", exc.param or "prompt") from None
        return list(zip(batch, per_prompt))

    async def run_batch(self, batch: Sequence[tuple[TokenizedPrompt, SamplingParams]], *,
                        on_result: Callable[[GenerationResult], None] | None = None) -> list[GenerationResult]:
        """All of a prepared batch (continuous batching), results in prompt order. At most ``max_num_choices`` engine
        requests (a prompt's n samples count n) are submitted at a time, the rest as those finish, so a batch larger
        than the queue runs to its end (vLLM's ``LLM.generate`` over any number of prompts). If one fails, or this is
        cancelled, every other request of the batch is cancelled before this returns."""
        self.check_loop()
        slots = asyncio.Semaphore(self.max_num_choices)
        taking = asyncio.Lock()  # one prompt takes its n slots at a time: two holding some each could wait forever

        async def one(prompt: TokenizedPrompt, params: SamplingParams) -> GenerationResult:
            num_taken = 0
            try:
                async with taking:
                    for _ in range(params.n):
                        await slots.acquire()
                        num_taken += 1
                result = await self.generate(prompt, params)
            finally:
                for _ in range(num_taken):
                    slots.release()
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
        """Stop the cluster and wait for it. There is one stop: a later call (``async with``'s exit after
        ``shutdown()``) waits for the one under way, which a cancelled caller does not cancel."""
        await asyncio.shield(self.shutdown())

    def shutdown(self) -> "asyncio.Task[None]":
        """vLLM's ``AsyncLLM.shutdown()``: the stop as a task of this AsyncLLM's loop (call it there). A plain
        call starts it; ``await llm.shutdown()`` also waits for it to end."""
        self.check_loop()
        if self._stop_task is None:
            self.is_closed = True
            self._finalizer.detach()
            self._stop_task = asyncio.ensure_future(self.cluster.stop())
        return self._stop_task

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # no loop runs on this thread
        return None
