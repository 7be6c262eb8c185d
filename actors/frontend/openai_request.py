"""Parsing and validation of request bodies: OpenAI completions and chat, and the
WebSocket stream request.

Each parser turns a decoded JSON object into a ``GenerateRequest`` or raises
``ApiError(400)`` naming the bad field: a wrong type, a number past the float
or int64 range (the typed fields are ``body_fields``'), or a field this server
does not implement.  Other value ranges
are left to ``SamplingParams``, which raises ``RequestError`` with a clear message.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastdecode.actors.frontend.body_fields import (
    boolean_field,
    chat_max_tokens,
    checked_text,
    continuous_usage_field,
    include_usage_field,
    integer_field,
    is_int,
    logprobs_count,
    max_tokens_field,
    prompt_logprobs_field,
    sampling_fields,
    shown,
    truncate_prompt_tokens_field,
)
from fastdecode.actors.frontend.choice_text import ChoiceParsing
from fastdecode.actors.frontend.errors import ApiError, bad_request
from fastdecode.actors.frontend.tool_fields import ToolCalling, ToolServing, tools_and_choice
from fastdecode.actors.model.config import SamplingDefaults
from fastdecode.actors.reasoning_parsers import think_tag_ids
from fastdecode.actors.request import RequestError, SamplingParams, truncate_prompt

LARGE_BODY_BYTES = 1 << 20  # bodies from this size are decoded and checked off the event loop
MAX_BODY_BYTES = 16 << 20  # a request body (or WebSocket message) past this is refused (413)
T = TypeVar("T")

# vLLM/OpenAI fields this server does not implement -> the values that change nothing; any other value is
# refused rather than silently ignored
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "guided_decoding_backend": (None, "auto", "xgrammar"),  # the one backend here
    "use_beam_search": (None, False),
    "continue_final_message": (None, False),
    "logprob_token_ids": (None,),
    "truncation_side": (None,),
    "thinking_token_budget": (None,),
}
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    "add_generation_prompt": (None, True),
    "echo": (None, False),
    # vLLM too refuses a request's own template unless started with --trust-request-chat-template
    "chat_template": (None,),
}
# keys of chat_template_kwargs the server sets itself (add_special_tokens: the request's own field, which
# Tokenizer.encode_chat takes beside the template variables)
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "add_special_tokens", "bos_token",
                                      "eos_token", "raise_exception", "strftime_now", "tokenize"})


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request as the Frontend understood it."""

    model: str | None
    prompt: str | tuple[int, ...] | None = None  # text or token ids; None for ``messages`` or ``prompts``
    messages: tuple[dict[str, str], ...] | None = None
    prompts: tuple[str | tuple[int, ...], ...] = ()  # a completions batch of several prompts (then prompt is None)
    num_samples: int = 1  # n: samples per prompt, each its own engine request (choices: prompts x n)
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields but max_tokens/logprobs
    max_tokens: int | None = None  # None: up to the end of the context; 0 (with echo only): the prompt alone
    num_logprobs: int | None = None  # top logprobs per token; None: no logprobs at all
    num_prompt_logprobs: int | None = None  # top logprobs per prompt token (vLLM's prompt_logprobs); None: none
    is_stream: bool = False
    is_usage_streamed: bool = False
    is_usage_continuous: bool = False  # usage on every chunk (vLLM's stream_options.continuous_usage_stats)
    add_special_tokens: bool | None = None  # None: the route's default (completions True, chat False)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra chat template variables
    is_token_id_text: bool = False  # logprob tokens as "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    is_echo: bool = False  # completions' echo: each choice's text starts with its prompt's
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens (``truncated``)
    tool_calling: ToolCalling | None = None  # chat: the calls to find in each choice's text (None: none)
    reasoning_parser: str | None = None  # chat: the server's --reasoning-parser (None: the text is not split)
    is_reasoning_shown: bool = True  # vLLM's include_reasoning

    def for_tokenizer(self, tokenizer: Any) -> "GenerateRequest":
        """This request as the model of ``tokenizer`` serves it: a structured output of a request whose thinking
        would be split off holds the answer after the ``</think>`` token; where the tags are no tokens of the
        vocabulary (a model that does not think in tags) it holds the whole text, which is then not split."""
        if self.reasoning_parser is None or "structured_outputs" not in self.sampling or think_tag_ids(tokenizer):
            return self
        return dataclasses.replace(self, reasoning_parser=None)

    def parsing_for(self, tokenizer: Any, prompt_ids: Sequence[int]) -> ChoiceParsing | None:
        """``parsing`` for a choice of ``prompt_ids`` (``ChoiceParsing.for_prompt``)."""
        parsing = self.parsing
        return None if parsing is None else parsing.for_prompt(tokenizer, prompt_ids)

    @property
    def parsing(self) -> ChoiceParsing | None:
        """How each chat choice's text is read (None: shown as it is)."""
        if self.tool_calling is None and self.reasoning_parser is None:
            return None
        return ChoiceParsing(self.tool_calling, self.reasoning_parser, self.is_reasoning_shown)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) or 1

    def per_prompt(self) -> list["GenerateRequest"]:
        """One request per prompt of a batch (the request itself when it has one prompt)."""
        return [dataclasses.replace(self, prompt=p, prompts=()) for p in self.prompts] or [self]

    def sampling_params(self, num_prompt_tokens: int, max_model_len: int,
                        defaults: SamplingDefaults | None = None) -> SamplingParams:
        """The request's parameters (its ``n``: ``samples_params`` makes one engine request of each sample),
        checking that prompt plus output fit the context; ``defaults`` (the model's generation config) fill the
        sampling fields the request left out, and their ``max_tokens`` (max_new_tokens) caps the output of every
        request, as in vLLM.  An echo with ``max_tokens`` 0 generates one token, which the response leaves out (vLLM's
        echo without generation); an echo with logprobs asks for the prompt's too, as many top ones as ``logprobs``
        unless ``prompt_logprobs`` says (vLLM's)."""
        defaults = defaults or SamplingDefaults()
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt has {num_prompt_tokens} tokens; this model's context is "
                                f"{max_model_len} tokens and at least one must be generated",
                           param="prompt", code="context_length_exceeded")
        max_tokens = room if self.max_tokens is None else max(self.max_tokens, 1)
        if max_tokens > room:
            raise ApiError(400, f"this model's context is {max_model_len} tokens; the prompt has "
                                f"{num_prompt_tokens} and max_tokens asks for {max_tokens} more",
                           param="max_tokens", code="context_length_exceeded")
        if defaults.max_tokens is not None:  # the generation config's max_new_tokens caps every request (vLLM's)
            max_tokens = min(max_tokens, defaults.max_tokens)
        fields = {**defaults.sampling_fields(), **self.sampling}
        if self.max_tokens == 0 and self.sampling.get("min_tokens"):  # not the 1 generated behind the echo
            raise bad_request(f"min_tokens ({self.sampling['min_tokens']}) must not exceed max_tokens (0)",
                              "min_tokens")
        prompt_logprobs = self.num_prompt_logprobs
        if prompt_logprobs is None and self.is_echo:
            prompt_logprobs = self.num_logprobs
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=self.num_logprobs, prompt_logprobs=prompt_logprobs,
                                  n=self.num_samples, **fields)
        except RequestError as exc:
            raise bad_request(str(exc), exc.param) from None

    def samples_params(self, num_prompt_tokens: int, max_model_len: int, defaults: SamplingDefaults | None = None,
                       tokenizer: Any = None) -> list[SamplingParams]:
        """``sampling_params`` of each of the n samples (``SamplingParams.samples``: sample i takes ``seed + i``, so
        each sample is the single request with that seed), each with the prompt's logprobs where asked (every choice
        shows its own), and its ``bad_words`` tokenized by ``tokenizer`` (where given).  Made and checked once, the
        samples differing in their seeds alone: a logit_bias over much of the vocabulary takes a tenth of a second to
        sort and check."""
        params = self.sampling_params(num_prompt_tokens, max_model_len, defaults)
        if tokenizer is not None:
            try:
                params = params.with_bad_words_token_ids(tokenizer)
            except RequestError as exc:
                raise bad_request(str(exc), exc.param) from None
        return params.samples()

    def truncated(self, prompt_ids: list[int], max_model_len: int) -> list[int]:
        """``prompt_ids`` cut to the request's ``truncate_prompt_tokens`` before their length is checked (vLLM's: -1
        keeps what max_tokens leaves of the context); 400 naming the field for a size past that."""
        try:
            return truncate_prompt(prompt_ids, self.truncate_prompt_tokens, max_model_len, self.max_tokens)
        except RequestError as exc:
            raise bad_request(str(exc), exc.param) from None


def decode_body(raw: bytes | str) -> dict[str, Any]:
    """The JSON object of a request body."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


async def parse_body(raw: bytes | str, parse: Callable[[dict[str, Any]], T]) -> T:
    """``parse(decode_body(raw))``, on a worker thread for a large body (decoding and checking megabytes of
    prompts takes seconds, which every other stream would wait out on the event loop)."""
    if len(raw) < LARGE_BODY_BYTES:
        return parse(decode_body(raw))
    return await asyncio.to_thread(lambda: parse(decode_body(raw)))


def parse_completion(body: dict[str, Any]) -> GenerateRequest:
    """``POST /v1/completions``."""
    _refuse_unsupported(body)
    is_echo = _completion_echo(body)
    prompts = _prompts(body.get("prompt"))
    is_stream = boolean_field(body, "stream")
    return GenerateRequest(
        model=model_field(body), prompt=prompts[0] if len(prompts) == 1 else None,
        prompts=prompts if len(prompts) > 1 else (), num_samples=_num_samples(body),
        sampling=sampling_fields(body), max_tokens=max_tokens_field(body, default=16, is_zero_allowed=is_echo),
        num_logprobs=logprobs_count(body, "logprobs"), num_prompt_logprobs=prompt_logprobs_field(body, is_stream),
        is_stream=is_stream, is_usage_streamed=include_usage_field(body, is_stream),
        is_usage_continuous=continuous_usage_field(body),
        add_special_tokens=boolean_field(body, "add_special_tokens", default=None),
        is_token_id_text=boolean_field(body, "return_tokens_as_token_ids"), is_echo=is_echo,
        truncate_prompt_tokens=truncate_prompt_tokens_field(body),
    )


def parse_chat(body: dict[str, Any], *, tool_serving: ToolServing = ToolServing(),
               reasoning_parser: str | None = None) -> GenerateRequest:
    """``POST /v1/chat/completions``; ``tool_serving``: the server's tool calling (``tool_fields``);
    ``reasoning_parser``: its --reasoning-parser (``choice_text``)."""
    _refuse_unsupported(body, is_chat=True)
    tools, tool_calling = tools_and_choice(body, tool_serving)
    template_kwargs = template_variables(body, tools)
    num_logprobs = None
    if boolean_field(body, "logprobs"):
        num_logprobs = logprobs_count(body, "top_logprobs") or 0
    elif logprobs_count(body, "top_logprobs"):  # 0 is taken without logprobs (vLLM's check)
        raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
    is_stream = boolean_field(body, "stream")
    return GenerateRequest(
        model=model_field(body), messages=parse_messages(body.get("messages")), num_samples=_num_samples(body),
        sampling=_tool_sampling_fields(body, tool_calling), max_tokens=chat_max_tokens(body),
        num_logprobs=num_logprobs, num_prompt_logprobs=prompt_logprobs_field(body, is_stream), is_stream=is_stream,
        is_usage_streamed=include_usage_field(body, is_stream), is_usage_continuous=continuous_usage_field(body),
        add_special_tokens=boolean_field(body, "add_special_tokens", default=None),
        chat_template_kwargs=template_kwargs,
        is_token_id_text=boolean_field(body, "return_tokens_as_token_ids"),
        truncate_prompt_tokens=truncate_prompt_tokens_field(body), tool_calling=tool_calling,
        reasoning_parser=reasoning_parser, is_reasoning_shown=boolean_field(body, "include_reasoning", default=True),
    )


def _tool_sampling_fields(body: dict[str, Any], tool_calling: ToolCalling | None) -> dict[str, Any]:
    """The sampling fields with what the tool choice asks: a named or required choice's structured output (which the
    request's own options, such as disable_any_whitespace, apply to; its own spec is then a 400), and the special
    tokens kept in the text for the hermes parser (vLLM's: its tags may be special tokens), unless the request says."""
    spec = tool_calling.structured_outputs() if tool_calling is not None else None
    sampling = sampling_fields(body, ("tool_choice", spec) if spec is not None else None)
    if tool_calling is not None and tool_calling.parser == "hermes":
        sampling = {"skip_special_tokens": False, **sampling}
    return sampling


def parse_stream_request(body: dict[str, Any]) -> GenerateRequest:
    """The one JSON message of a ``/v1/stream`` WebSocket: ``prompt`` or ``messages`` plus sampling fields, a prompt's
    checked as ``/v1/completions`` checks them and messages' as the chat route's (``max_completion_tokens``, tools,
    response_format).  A prompt's ``echo`` is refused: the token messages have no place for the prompt's text."""
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    _refuse_unsupported(body, is_chat=has_messages)
    prompt_logprobs_field(body, is_stream=True)
    if has_prompt == has_messages:
        raise bad_request("give exactly one of prompt and messages")
    if _num_samples(body) != 1:
        raise bad_request("n must be 1 on the WebSocket stream (one choice per socket)", "n")
    if has_prompt and _completion_echo(body):
        raise bad_request("echo is not supported on the WebSocket stream", "echo")
    return GenerateRequest(
        model=model_field(body),
        prompt=_one_prompt(body["prompt"]) if has_prompt else None,
        messages=parse_messages(body["messages"]) if has_messages else None,
        sampling=sampling_fields(body),
        max_tokens=chat_max_tokens(body) if has_messages else max_tokens_field(body, default=None),
        num_logprobs=logprobs_count(body, "logprobs"), is_stream=True,
        add_special_tokens=boolean_field(body, "add_special_tokens", default=None),
        chat_template_kwargs=template_variables(body, tools_and_choice(body, None)[0]) if has_messages else {},
        truncate_prompt_tokens=truncate_prompt_tokens_field(body),
    )


# ---- fields ---------------------------------------------------------------------------------
def _refuse_unsupported(body: dict[str, Any], *, is_chat: bool = False) -> None:
    """400 for a field this server does not do (unless given its harmless value), and for a ``user`` that is not a
    string (taken and unused, but typed: vLLM's is a str)."""
    unsupported = {**UNSUPPORTED_FIELDS, **UNSUPPORTED_CHAT_FIELDS} if is_chat else UNSUPPORTED_FIELDS
    for name, harmless in unsupported.items():
        if body.get(name) not in harmless:
            raise bad_request(f"{name} is not supported", name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request(f"user must be a string, got {shown(body['user'])}", "user")


def _completion_echo(body: dict[str, Any]) -> bool:
    """The completions ``echo``, checking the field only completions take (``suffix``, refused)."""
    is_echo = boolean_field(body, "echo")
    if body.get("suffix") is not None:
        raise bad_request("suffix is not supported", "suffix")
    return is_echo


def template_variables(body: dict[str, Any], tools: list[Any] | None) -> dict[str, Any]:
    """A chat's ``chat_template_kwargs`` with ``tools`` (where given) for the template's ``tools`` variable."""
    return {"tools": tools, **template_kwargs_field(body)} if tools else template_kwargs_field(body)


def template_kwargs_field(body: dict[str, Any]) -> dict[str, Any]:
    """``chat_template_kwargs``: extra variables of the chat template ({} when omitted); 400 for what is not an
    object or sets a variable the server sets itself."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise bad_request("chat_template_kwargs must be an object", "chat_template_kwargs")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(reserved)} (the server sets it)",
                          "chat_template_kwargs")
    return dict(kwargs)


def model_field(body: dict[str, Any]) -> str | None:
    """The body's ``model`` (None when omitted); 400 if it is not a string."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    return model


def _num_samples(body: dict[str, Any]) -> int:
    """``n`` (default 1); vLLM's ``best_of``, where given, must equal it: every sample is returned."""
    num_samples = 1 if body.get("n") is None else integer_field(body, "n")
    if num_samples < 1:
        raise bad_request(f"n must be at least 1, got {num_samples}", "n")
    best_of = body.get("best_of")
    if best_of is not None and (not is_int(best_of) or best_of != num_samples):
        raise bad_request(f"best_of must equal n ({num_samples}) if given: every sample is returned, got "
                          f"{shown(best_of)}", "best_of")
    return num_samples


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """The completions ``prompt``: one text or token-id list, or a list of them (vLLM's batch)."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        return tuple(_prompt(p, f"prompt[{index}]") for index, p in enumerate(value))
    return (_prompt(value),)


def _one_prompt(value: Any) -> str | tuple[int, ...]:
    """A prompt where one is served (the WebSocket stream): a batch of one is unwrapped, as before batches."""
    prompts = _prompts(value)
    if len(prompts) != 1:
        raise bad_request(f"one prompt per socket: got {len(prompts)}", "prompt")
    return prompts[0]


def _prompt(value: Any, name: str = "prompt") -> str | tuple[int, ...]:
    if isinstance(value, str):
        if not value:
            raise bad_request(f"{name} is empty" if name != "prompt" else "the prompt is empty", "prompt")
        return checked_text(value, name)
    if isinstance(value, list) and value and all(is_int(t) for t in value):
        return tuple(value)
    raise bad_request(f"{name} must be a non-empty string or a non-empty list of token ids", "prompt")


def parse_messages(value: Any) -> tuple[dict[str, Any], ...]:
    """Chat ``messages`` as ``{role, content}`` dicts (text parts joined), with a message's ``name``, a tool
    message's ``tool_call_id`` and an assistant message's ``tool_calls`` for the chat template, as vLLM passes them
    (a call's JSON ``arguments`` as an object); 400 naming the bad message.  An assistant message's null content
    (OpenAI's, beside tool_calls in a replayed history) is empty text."""
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list", "messages")
    messages = []
    for index, message in enumerate(value):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object", param)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{param}.role must be a non-empty string", f"{param}.role")
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if not all(isinstance(p, str) for p in parts):
                raise bad_request(f"{param}.content: only text parts are supported", f"{param}.content")
            content = "\n".join(parts)  # as vLLM joins text parts
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"{param}.content must be a string or a list of text parts", f"{param}.content")
        parsed = {"role": checked_text(role, f"{param}.role"), "content": checked_text(content, f"{param}.content")}
        for name in ("name", "tool_call_id"):
            if message.get(name) is not None:
                if not isinstance(message[name], str):
                    raise bad_request(f"{param}.{name} must be a string", f"{param}.{name}")
                parsed[name] = checked_text(message[name], f"{param}.{name}")
        if message.get("tool_calls") is not None:
            parsed["tool_calls"] = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
        messages.append(parsed)
    return tuple(messages)


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    """A replayed assistant message's ``tool_calls``: ``[{id, type, function: {name, arguments}}]``, the arguments a
    JSON string (OpenAI's) given to the template as the object it encodes, as vLLM does (templates index them); an
    object (transformers' style, through ``LLM.chat``) is taken as it is, and none as ``{}``."""
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a list", param)
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(arguments, (str, dict, list, type(None))):
            raise bad_request(f"{param}[{index}] must be {{\"id\", \"type\": \"function\", \"function\": "
                              f"{{\"name\", \"arguments\": a JSON string}}}}", f"{param}[{index}]")
        if not arguments:
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as the text it is, as vLLM keeps it
            except RecursionError:
                raise bad_request(f"{param}[{index}].function.arguments nest too deeply",
                                  f"{param}[{index}].function.arguments") from None
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return calls
