"""What a generation request asks for, and what comes back per token.

Shared by the engines (single-process reference and the heterogeneous Executor),
the Frontend and the embedding API. Plain data, validated on construction.
"""
from __future__ import annotations

import copy
import enum
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from fastdecode.actors.structured_output import StructuredOutputs

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's ``_SAMPLING_EPS``)
MAX_BAD_WORDS = 128  # token sequences of one request's bad_words (vLLM's VLLM_MAX_NUM_BAD_WORDS default)


class RequestError(ValueError):
    """A request that cannot be served as asked (bad field, prompt too long...).

    ``param`` names the request field at fault, where there is one (the OpenAI error's ``param``).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestOutputKind(enum.IntEnum):
    """vLLM's ``RequestOutputKind``: what iterating ``AsyncLLM.generate`` yields (``SamplingParams.output_kind``).
    CUMULATIVE: everything so far, at each output; DELTA: only what is new since the last; FINAL_ONLY: the final
    output alone. Awaiting ``generate`` gives the final result whatever the kind."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request (OpenAI/vLLM meanings).

    ``temperature < SAMPLING_EPS`` (0 included) is greedy: a smaller one would
    underflow in float32 and divide by zero.  ``top_k`` -1 or 0, ``top_p == 1`` and ``min_p == 0`` disable
    those filters.  ``logit_bias`` maps token ids to a bias in [-100, 100] added to their logits (OpenAI's; a
    dict or pairs, stored as sorted pairs); ids past the vocabulary are refused at submission
    (``check_prompt``).  ``seed`` makes a sampled request reproducible on its own, whatever else is in the batch.  ``stop`` is one stop string or a
    sequence of them, ``stop_token_ids`` a sequence of ids (None: none); both are stored as tuples.  ``n`` samples of
    the prompt (vLLM's parallel sampling) are n engine requests of one sample each (``samples``).

    As vLLM's: ``include_stop_str_in_output`` keeps the stop string that ended the request in its text (and a stop
    token's or EOS's text, which is empty for a special token skipped); ``skip_special_tokens`` leaves special
    tokens out of the text; ``spaces_between_special_tokens`` False joins consecutive added tokens with no space
    between (it acts only with skip_special_tokens False); ``truncate_prompt_tokens`` k >= 1 keeps the prompt's
    last k tokens (-1: as many as ``max_tokens`` leaves of the context; ``truncated_prompt``); ``allowed_token_ids``
    are the only tokens that may be sampled (ids past the vocabulary refused at submission); ``bad_words`` are words
    that may not be generated: the last token of each word's tokens is banned where the output ends with the rest
    (``with_bad_words_token_ids`` tokenizes them, with and without a leading space).
    """

    max_tokens: int | None = 16  # None: up to the end of the context (vLLM's)
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's detokenizing and prompt fields (what they do: the class docstring's last paragraph)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None  # stored sorted and unique
    bad_words: tuple[str, ...] = ()
    logprobs: int | None = None  # number of top logprobs to return per token; None = none; -1: the vocabulary
    prompt_logprobs: int | None = None  # number of top logprobs to return per prompt token; None = none; -1: all
    n: int = 1  # samples of the prompt (vLLM's): AsyncLLM.generate's n outputs; an engine request is one sample
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what iterating AsyncLLM.generate yields (vLLM's)
    # vLLM's: the output held to a JSON schema, regex, choice or grammar (structured_output.StructuredOutputs; a
    # dict of its fields is taken too)
    structured_outputs: "StructuredOutputs | None" = None
    # the token that ends a reasoning model's thinking: structured outputs hold the text after it only (vLLM applies
    # a grammar once the thinking has ended); None: from the first token
    reasoning_end_token_id: int | None = None

    _bad_words_token_ids: ClassVar[tuple[tuple[int, ...], ...]] = ()  # per instance once tokenized

    def __post_init__(self) -> None:
        def bad(param: str, msg: str) -> RequestError:
            return RequestError(msg, param)

        # vLLM's ``stop: str | list[str]``: a str is one stop string, not its characters
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop", is_str_one=True))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise bad("max_tokens", f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise bad("top_k", f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < -1:
            raise bad("top_k", f"top_k must be -1 or 0 (disabled) or at least 1, got {self.top_k}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        end_id = self.reasoning_end_token_id
        if end_id is not None and (isinstance(end_id, bool) or not isinstance(end_id, int) or end_id < 0):
            raise bad("reasoning_end_token_id", f"reasoning_end_token_id must be a token id, got {end_id!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"n must be a positive integer, got {self.n!r}")
        if isinstance(self.output_kind, bool) or self.output_kind not in tuple(RequestOutputKind):
            names = ", ".join(kind.name for kind in RequestOutputKind)
            raise bad("output_kind", f"output_kind must be a RequestOutputKind ({names}), got {self.output_kind!r}")
        object.__setattr__(self, "output_kind", RequestOutputKind(self.output_kind))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):  # how many the engine allows is its max_logprobs'
            count = getattr(self, name)
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < -1):
                raise bad(name, f"{name} must be a non-negative integer or -1 (the whole vocabulary), got {count!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "stop must be a non-empty string or a list of them")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "stop_token_ids must be non-negative integers")
        for name in ("include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        check_truncate_prompt_tokens(self.truncate_prompt_tokens)
        if self.allowed_token_ids is not None:
            allowed = _as_tuple(self.allowed_token_ids, "allowed_token_ids")
            if not allowed:
                raise bad("allowed_token_ids", "allowed_token_ids must not be empty (None allows every token)")
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in allowed):
                raise bad("allowed_token_ids", "allowed_token_ids must be non-negative integers")
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(allowed))))
        bad_words = tuple(dict.fromkeys(_as_tuple(self.bad_words, "bad_words")))  # unique, in order (vLLM's)
        if not all(isinstance(word, str) and word for word in bad_words):
            raise bad("bad_words", "bad_words must be a list of non-empty strings")
        object.__setattr__(self, "bad_words", bad_words)
        if self.structured_outputs is not None:
            from fastdecode.actors.structured_output import StructuredOutputs

            spec = self.structured_outputs
            if isinstance(spec, dict):
                try:
                    spec = StructuredOutputs(**spec)
                except TypeError as exc:  # a key it has not
                    raise bad("structured_outputs", f"structured_outputs: {exc}") from None
            if not isinstance(spec, StructuredOutputs):
                raise bad("structured_outputs", "structured_outputs must be a StructuredOutputs (or a dict of its "
                          f"fields), got {type(spec).__name__}")
            object.__setattr__(self, "structured_outputs", spec)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def truncated_prompt(self, prompt_ids: list[int], max_model_len: int) -> list[int]:
        """``prompt_ids`` cut to their last ``truncate_prompt_tokens`` (``truncate_prompt``)."""
        return truncate_prompt(prompt_ids, self.truncate_prompt_tokens, max_model_len, self.max_tokens)

    @property
    def bad_words_token_ids(self) -> tuple[tuple[int, ...], ...]:
        """The token ids of ``bad_words`` (``with_bad_words_token_ids``); () until they are tokenized."""
        return self._bad_words_token_ids

    def with_bad_words_token_ids(self, tokenizer) -> "SamplingParams":
        """These parameters with ``bad_words`` tokenized by ``tokenizer`` (its ``encode(text,
        add_special_tokens=False)``), as vLLM's ``update_from_tokenizer``: each word's tokens, and also those of
        the word after a space where that makes a new first token of as many tokens (a word in mid-text).
        RequestError (``bad_words``) for a word of no token, or more than MAX_BAD_WORDS sequences."""
        if not self.bad_words or self._bad_words_token_ids:
            return self
        sequences: list[tuple[int, ...]] = []
        for word in self.bad_words:
            plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
            if not plain:
                raise RequestError(f"bad_words entry {word!r} tokenizes to no token", "bad_words")
            spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            sequences.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
            if len(sequences) > MAX_BAD_WORDS:
                raise RequestError(f"too many bad words after tokenization: more than {MAX_BAD_WORDS} token "
                                   "sequences", "bad_words")
        params = self._replaced()
        object.__setattr__(params, "_bad_words_token_ids", tuple(sequences))
        return params

    def with_seed(self, seed: int) -> "SamplingParams":
        """These parameters with another ``seed`` (n samples of one request differ there alone)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
        return self._replaced(seed=seed)

    def with_vocab_logprobs(self, vocab_size: int) -> "SamplingParams":
        """These parameters with a ``logprobs`` or ``prompt_logprobs`` of -1 (vLLM's: the whole vocabulary) as
        ``vocab_size``."""
        fields = {name: vocab_size for name in ("logprobs", "prompt_logprobs") if getattr(self, name) == -1}
        return self._replaced(**fields) if fields else self

    def with_reasoning_end(self, token_id: int) -> "SamplingParams":
        """These parameters with their structured output held after ``token_id`` (``reasoning_end_token_id``)."""
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise RequestError(f"reasoning_end_token_id must be a token id, got {token_id!r}", "reasoning_end_token_id")
        return self._replaced(reasoning_end_token_id=token_id)

    def samples(self, is_prompt_logprobs_once: bool = False) -> list["SamplingParams"]:
        """The ``n`` samples as engine requests of one sample each: sample i seeded ``seed + i`` where a seed is
        given (vLLM's parallel sampling: each sample is the single request with that seed), the same otherwise.
        Each asks the prompt's logprobs (the HTTP choices show theirs); with ``is_prompt_logprobs_once`` sample 0
        alone does (vLLM's ``RequestOutput`` has them once: ``AsyncLLM.generate``)."""
        one = self._replaced(n=1)
        if self.seed is None:
            samples = [one] * self.n
        else:
            samples = [one.with_seed(self.seed + index) for index in range(self.n)]
        if is_prompt_logprobs_once:
            samples[1:] = [sample._replaced(prompt_logprobs=None) for sample in samples[1:]]
        return samples

    def within(self, room: int) -> "SamplingParams":
        """These parameters as one engine request runs them, for a prompt that leaves ``room`` tokens of the
        context: ``max_tokens`` None (vLLM's "to the end of the context") becomes ``room``. RequestError (param
        ``n``) for n > 1: an engine request is one sample, and would silently make one."""
        if self.n != 1:
            raise RequestError(f"an engine request is one sample, and these parameters ask for n={self.n}: submit "
                               "each of SamplingParams.samples() (AsyncLLM.generate and LLM.generate do)", "n")
        return self if self.max_tokens is not None else self._replaced(max_tokens=room)

    def _replaced(self, **fields) -> "SamplingParams":
        """A copy with ``fields`` set, the others not checked again (``__post_init__`` goes over every stop string,
        stop token id and bias entry)."""
        params = copy.copy(self)
        for name, value in fields.items():
            object.__setattr__(params, name, value)
        return params


def check_truncate_prompt_tokens(value: object) -> None:
    """RequestError (naming the field) unless ``value`` is None, -1 or a positive integer (vLLM's)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1)):
        raise RequestError(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {value!r}",
                           "truncate_prompt_tokens")


def truncate_prompt(prompt_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int,
                    max_tokens: int | None) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last k tokens (None: all of them), before the prompt's length
    is checked; -1 is k = what ``max_tokens`` (None: none) leaves of ``max_model_len``, and a k past that is a
    RequestError naming the field, as vLLM's (its TokenizeParams)."""
    if truncate_prompt_tokens is None:
        return prompt_ids
    max_input_tokens = max_model_len - (max_tokens or 0)
    if truncate_prompt_tokens == -1:
        truncate_prompt_tokens = max_input_tokens
    elif truncate_prompt_tokens > max_input_tokens:
        raise RequestError(f"truncate_prompt_tokens={truncate_prompt_tokens} cannot be greater than max_model_len - "
                           f"max_tokens = {max_input_tokens}: request a smaller truncation size",
                           "truncate_prompt_tokens")
    if truncate_prompt_tokens < 1 or len(prompt_ids) <= truncate_prompt_tokens:
        return prompt_ids
    return list(prompt_ids[-truncate_prompt_tokens:])


class LogitBias(tuple):
    """``logit_bias`` as sorted, checked ``(token id, bias)`` pairs (``of``): a ``SamplingParams`` given one takes it
    as it is, so one request's many prompts and samples sort and check a large bias once."""

    @classmethod
    def of(cls, value) -> "LogitBias":
        """From a dict or pairs (None: none); RequestError naming ``logit_bias`` for what is not ids to biases in
        [-100, 100]."""
        if value is None:
            return cls()
        if isinstance(value, LogitBias):
            return value
        try:
            pairs = sorted(dict(value).items())
        except (TypeError, ValueError):
            raise RequestError("logit_bias must map token ids to biases", "logit_bias") from None
        for token_id, bias in pairs:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise RequestError(f"logit_bias keys must be token ids (non-negative integers), got {token_id!r}",
                                   "logit_bias")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                raise RequestError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token "
                                   f"{token_id}", "logit_bias")
        return cls((token_id, float(bias)) for token_id, bias in pairs)


def _bias_pairs(value) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted ``(token id, bias)`` pairs: from a dict, pairs or a ``LogitBias``; None is none."""
    return LogitBias.of(value)


def _as_tuple(value, param: str, *, is_str_one: bool = False) -> tuple:
    """A list/tuple field as a tuple; None is empty; with ``is_str_one`` a str is one item."""
    if value is None:
        return ()
    if is_str_one and isinstance(value, str):
        return (value,)
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise RequestError(f"{param} must be a list, got {type(value).__name__}", param)
    return tuple(value)


@dataclass(frozen=True)
class PromptLogprob:
    """The model's logprob of one prompt token given the tokens before it, that token's rank in the model's
    distribution (1: the most likely) and the ``prompt_logprobs`` most likely tokens there, best first."""

    logprob: float
    rank: int
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Logprob:
    """vLLM's ``Logprob``: one token's logprob at one position, its rank there (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, as the engine reports it.

    ``finish_reason`` is set on the request's last event: ``"stop"`` (EOS, stop
    token or stop string), ``"length"`` (max_tokens or the context end),
    ``"abort"`` (cancelled) or ``"error"`` (then ``error`` says why and
    ``token_id`` is -1; ``is_retryable`` when the server, not the request, is
    what failed: shutting down, or no KV node left).  A request that asked for ``prompt_logprobs`` gets them
    on its first event (index 0) only: one entry per prompt token, None for the first, which follows nothing.
    """

    request_id: int
    token_id: int
    index: int  # position of this token in the output, from 0
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    is_retryable: bool = False
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    rank: int | None = None  # the token's rank in the raw distribution (1: the likeliest), with ``logprob``
    # when the engine made it (time.monotonic()): what latency metrics count, not when a reader took it (vLLM's
    # engine timestamps; a slow client must not show as slow tokens)
    made_at: float = field(default_factory=time.monotonic, compare=False)


@dataclass
class GenerationResult:
    """A finished request: what ``generate`` returns per prompt.

    It also reads as vLLM's ``RequestOutput`` (``request_id``, ``prompt``, ``prompt_token_ids``, ``prompt_logprobs``,
    ``finished`` and ``outputs[i]``'s ``text``, ``token_ids``, ``cumulative_logprob``, ``finish_reason``,
    ``stop_reason``, ``logprobs``, ``index``), for code written against vLLM's ``LLM.generate``. Its own fields are
    sample 0's; a request of ``SamplingParams.n`` > 1 holds the other samples in ``other_samples``.
    """

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)  # of each generated token, where asked for
    prompt: str | None = None  # the prompt's text, where it was given as text
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (None: EOS, length)
    request_id: str | None = None  # the caller's request_id where it gave one, else the engine's id (a str, as vLLM's)
    num_logprobs: int | None = None  # the request's SamplingParams.logprobs: None where it asked for none
    # vLLM's: where SamplingParams.prompt_logprobs asked, None for the first prompt token, then per prompt token
    # {token id: Logprob} of that token and the most likely ones there; else None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # vLLM's CompletionOutput.logprobs, where SamplingParams.logprobs asked: per generated token {token id: Logprob}
    # of the sampled token, then of the most likely ones there
    position_logprobs: list[dict[int, Logprob]] | None = None
    # samples 1 to n-1 of a request of SamplingParams.n > 1, each read as this one (their prompt_logprobs None)
    other_samples: list["GenerationResult"] = field(default_factory=list)

    @property
    def outputs(self) -> list["CompletionOutput"]:
        """vLLM's ``RequestOutput.outputs``: the request's ``n`` completions, this result's own first (index 0)."""
        return [CompletionOutput(sample, index) for index, sample in enumerate((self, *self.other_samples))]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_logprobs_requested(self) -> bool:
        return self.num_logprobs is not None or bool(self.logprobs)


class CompletionOutput:
    """vLLM's ``CompletionOutput`` read through a ``GenerationResult``: a view, it copies nothing.

    ``logprobs`` are vLLM's per-position dicts (the sampled token's ``Logprob``, then the most likely ones), None
    where the request asked for none; ``GenerationResult.logprobs`` keeps the sampled tokens' floats."""

    __slots__ = ("_result", "_index")

    def __init__(self, result: GenerationResult, index: int = 0) -> None:
        self._result = result
        self._index = index

    @property
    def index(self) -> int:
        """The sample's index among the request's ``n`` (vLLM's), from 0."""
        return self._index

    @property
    def text(self) -> str:
        return self._result.text

    @property
    def token_ids(self) -> list[int]:
        return self._result.token_ids

    @property
    def finish_reason(self) -> str | None:
        return self._result.finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self._result.stop_reason

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        return self._result.position_logprobs

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the sampled tokens' logprobs where the request asked for logprobs, else None (vLLM's)."""
        return float(sum(self._result.logprobs)) if self._result.is_logprobs_requested else None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids!r}, "
                f"cumulative_logprob={self.cumulative_logprob!r}, finish_reason={self.finish_reason!r}, "
                f"stop_reason={self.stop_reason!r})")
