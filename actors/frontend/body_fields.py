"""Typed fields of an OpenAI request body: numbers within the float and int64 ranges, booleans, text the tokenizer
can take, the sampling fields (stop strings, bad words and logit_bias bounded), output limits, logprob counts and
stream options. Each raises ``ApiError(400)`` naming the field; ``openai_request`` builds the requests from them."""
from __future__ import annotations

import math
from typing import Any

from fastdecode.actors.frontend.errors import bad_request
from fastdecode.actors.frontend.structured_fields import structured_outputs_field
from fastdecode.actors.request import MAX_BAD_WORDS, LogitBias, RequestError, check_truncate_prompt_tokens
from fastdecode.actors.structured_output import StructuredOutputs

MIN_INT64, MAX_INT64 = -(1 << 63), (1 << 63) - 1  # every integer field is an int64 (vLLM bounds seed so)
# a request's stop strings, every one searched for at every token on the event loop (100k of them took 83 ms a token);
# vLLM has no limit, OpenAI takes 4, TGI 4 by default
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 16384  # their characters in all


def sampling_fields(body: dict[str, Any], structured: tuple[str, StructuredOutputs] | None = None) -> dict[str, Any]:
    """The body's sampling fields; ``structured``: a structured output another field implies (``tool_choice``)."""
    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if body.get(name) is not None:
            fields[name] = number_field(body, name)
    if body.get("logit_bias") is not None:
        fields["logit_bias"] = logit_bias_field(body)
    for name in ("top_k", "min_tokens", "seed"):
        if body.get(name) is not None:
            fields[name] = integer_field(body, name)
    for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"):
        if body.get(name) is not None:
            fields[name] = boolean_field(body, name)
    for name in ("stop_token_ids", "allowed_token_ids"):
        if body.get(name) is not None:
            fields[name] = token_ids_field(body, name)
    if body.get("bad_words") is not None:
        fields["bad_words"] = bad_words_field(body)
    spec = structured_outputs_field(body, structured)
    if spec is not None:
        fields["structured_outputs"] = spec
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad_request("stop must be a non-empty string or a list of them", "stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"stop has {len(stop)} strings: at most {MAX_STOP_STRINGS} stop strings are allowed",
                              "stop")
        num_chars = sum(len(s) for s in stop)
        if num_chars > MAX_STOP_CHARS:
            raise bad_request(f"stop has {num_chars} characters in all: at most {MAX_STOP_CHARS} characters are "
                              "allowed", "stop")
        fields["stop"] = tuple(stop)
    return fields


def token_ids_field(body: dict[str, Any], name: str) -> tuple[int, ...]:
    """A list of token ids (``stop_token_ids``, ``allowed_token_ids``); their range is SamplingParams' and the
    Executor's to check."""
    value = body[name]
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        raise bad_request(f"{name} must be a list of integers", name)
    return tuple(value)


def bad_words_field(body: dict[str, Any]) -> tuple[str, ...]:
    """vLLM's ``bad_words``: a list of strings, each tokenized for the request (at most MAX_BAD_WORDS, which vLLM
    allows as token sequences, and MAX_STOP_CHARS characters in all: tokenized on the event loop)."""
    value = body["bad_words"]
    if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
        raise bad_request("bad_words must be a list of strings", "bad_words")
    for word in value:
        checked_text(word, "bad_words")
    if len(value) > MAX_BAD_WORDS:
        raise bad_request(f"bad_words has {len(value)} words: at most {MAX_BAD_WORDS} are allowed", "bad_words")
    if sum(len(word) for word in value) > MAX_STOP_CHARS:
        raise bad_request(f"bad_words has more than {MAX_STOP_CHARS} characters in all", "bad_words")
    return tuple(value)


def truncate_prompt_tokens_field(body: dict[str, Any]) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: None, -1 or a positive integer (``truncate_prompt``)."""
    if body.get("truncate_prompt_tokens") is None:
        return None
    value = integer_field(body, "truncate_prompt_tokens")
    try:
        check_truncate_prompt_tokens(value)
    except RequestError as exc:
        raise bad_request(str(exc), exc.param) from None
    return value


def logit_bias_field(body: dict[str, Any]) -> LogitBias:
    """OpenAI's ``logit_bias``: an object of token ids (as strings, JSON's keys) to biases in [-100, 100], sorted and
    checked here once (``LogitBias``); the ids against the vocabulary are the Executor's to check (``check_prompt``)."""
    value = body["logit_bias"]
    if not isinstance(value, dict):
        raise bad_request("logit_bias must be an object of token ids to biases", "logit_bias")
    biases = {}
    for key, bias in value.items():
        if not key.isascii() or not key.isdigit() or len(key) > 19:
            raise bad_request(f"logit_bias keys must be token ids, got {shown(key)}", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise bad_request(f"logit_bias values must be numbers, got {shown(bias)}", "logit_bias")
        biases[int(key)] = bias
    try:  # sorted and checked once here (off the loop for a large body), not again for each prompt or sample
        return LogitBias.of(biases)
    except RequestError as exc:
        raise bad_request(str(exc), "logit_bias") from None


def chat_max_tokens(body: dict[str, Any]) -> int | None:
    """Chat's output limit: ``max_completion_tokens`` (OpenAI's newer name) where given, else ``max_tokens``; None
    (up to the end of the context) when neither is."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return max_tokens_field(body, default=None, name=name)


def max_tokens_field(body: dict[str, Any], *, default: int | None, name: str = "max_tokens",
                is_zero_allowed: bool = False) -> int | None:
    """The output limit: ``default`` where the field is left out, None (to the end of the context) where it is null
    (vLLM's ``max_tokens: int | None = 16``); 0 only where ``is_zero_allowed`` (an echo: the prompt alone, as vLLM)."""
    if name not in body:
        return default
    if body[name] is None:
        return None
    value = integer_field(body, name)
    if value < 1 and not (value == 0 and is_zero_allowed):
        lowest = "0 (with echo)" if is_zero_allowed else "1"
        raise bad_request(f"{name} must be at least {lowest}, got {value}", name)
    return value


def logprobs_count(body: dict[str, Any], name: str) -> int | None:
    """A count of top logprobs, -1 for the whole vocabulary (vLLM's); how many the server allows is its
    ``--max-logprobs`` (checked at submission)."""
    if body.get(name) is None:
        return None
    value = integer_field(body, name)
    if value < -1:
        raise bad_request(f"{name} must be at least 0, or -1 (the whole vocabulary), got {value}", name)
    return value


def prompt_logprobs_field(body: dict[str, Any], is_stream: bool) -> int | None:
    """vLLM's ``prompt_logprobs``: top logprobs per prompt token, refused on a stream as vLLM does (the response
    carries them whole) unless 0, which vLLM takes there (and a stream shows none)."""
    value = logprobs_count(body, "prompt_logprobs")
    if value and is_stream:
        raise bad_request("prompt_logprobs are not available when stream is true", "prompt_logprobs")
    return None if is_stream else value


def include_usage_field(body: dict[str, Any], is_stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not is_stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    return boolean_field(options, "include_usage")


def continuous_usage_field(body: dict[str, Any]) -> bool:
    """``stream_options.continuous_usage_stats``: usage on every chunk, as in vLLM only together with
    ``include_usage`` (the options are checked by ``include_usage_field`` first)."""
    options = body.get("stream_options")
    if not isinstance(options, dict):
        return False
    is_continuous = boolean_field(options, "continuous_usage_stats")
    return is_continuous and boolean_field(options, "include_usage")


def is_int(value: Any) -> bool:
    """A JSON integer (``true``/``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """``repr(value)`` cut short: a request may send a number of hundreds of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def integer_field(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value):
        raise bad_request(f"{name} must be an integer, got {shown(value)}", name)
    if not MIN_INT64 <= value <= MAX_INT64:
        raise bad_request(f"{name} must be in [{MIN_INT64}, {MAX_INT64}], got {shown(value)}", name)
    return value


def number_field(body: dict[str, Any], name: str) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{name} must be a finite number, got {shown(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an int past the float range
        number = math.inf
    if not math.isfinite(number):
        raise bad_request(f"{name} must be a finite number, got {shown(value)}", name)
    return number


def boolean_field(body: dict[str, Any], name: str, *, default: bool | None = False) -> bool | None:
    """``body[name]`` as a bool, ``default`` when omitted or null; 400 naming the field for any other type."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {shown(value)}", name)
    return value


def checked_text(value: str, param: str) -> str:
    """``value`` itself if it is text the tokenizer can take: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which are no Unicode text (the tokenizer failed on them with a 500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode text: {exc.reason} at position {exc.start}", param) from None
    return value
