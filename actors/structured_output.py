"""Structured outputs (vLLM's ``StructuredOutputsParams``, OpenAI's ``response_format``): a request's output held to
a JSON schema, any JSON object, a regular expression, one of a list of choices, or an EBNF grammar.

``StructuredOutputs`` is the request's plain, hashable spec (a ``SamplingParams`` field). ``GrammarBackend`` turns
it into xgrammar's compiled grammar for the model's tokenizer (cached by spec: a server sees the same schema again
and again) and gives each such request a ``GrammarMatcher``: before each token is sampled, the matcher's bitmask
leaves only the tokens the grammar allows (``apply_bitmasks``); each token drawn advances it; once the grammar is
complete only a stop token (EOS) is allowed, which ends the request with finish_reason "stop".
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastdecode.actors.request import RequestError

if TYPE_CHECKING:
    import torch

    from fastdecode.actors.request import SamplingParams

PARAM = "structured_outputs"
KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20  # a schema, regex, grammar or the choices together (compiled on a worker thread)
CACHE_BYTES = 512 << 20  # compiled grammars kept for reuse, the least recently used dropped past it (vLLM's default)
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[17:29:18] /project/cpp/x.cc:4944: " before a message


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of: ``json``, a JSON schema (a dict, or its text); ``json_object``, any JSON object; ``regex``;
    ``choice``, one of these strings; ``grammar``, an EBNF grammar as xgrammar (and vLLM's default backend) takes
    it, with a ``root`` rule. A schema is kept as compact JSON text, its keys in their order (the model writes
    them in it). As vLLM's, ``disable_any_whitespace`` keeps JSON compact (else the whitespace JSON allows may come
    between tokens). ``param``: the request field the spec came from, named in its errors (not compared)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False  # JSON without the free whitespace between tokens a schema allows
    param: str = field(default=PARAM, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.disable_any_whitespace, bool):
            raise RequestError("disable_any_whitespace must be true or false", PARAM)
        if not isinstance(self.json_object, bool):
            raise RequestError(f"json_object must be true or false, got {self.json_object!r}", PARAM)
        given = self._kinds_given()
        if len(given) != 1:
            raise RequestError("structured outputs take exactly one of json, json_object, regex, choice and "
                               f"grammar, got {', '.join(given) or 'none'}", PARAM)
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise RequestError(f"the JSON schema is not JSON: {exc}", PARAM) from None
            if not isinstance(schema, (dict, bool)):
                raise RequestError("a JSON schema must be an object", PARAM)
            object.__setattr__(self, "json", json.dumps(schema, separators=(",", ":")))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise RequestError(f"{name} must be a non-empty string", PARAM)
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not isinstance(choice, Sequence) or not choice or not all(
                    isinstance(c, str) and c for c in choice):
                raise RequestError("choice must be a non-empty list of non-empty strings", PARAM)
            object.__setattr__(self, "choice", tuple(choice))
        if len(self.source) > MAX_SPEC_CHARS:
            raise RequestError(f"the structured output spec has more than {MAX_SPEC_CHARS} characters", PARAM)

    @property
    def kind(self) -> str:
        """Which of the kinds the spec is: json, json_object, regex, choice or grammar."""
        return self._kinds_given()[0]

    def _kinds_given(self) -> list[str]:
        return [name for name in KINDS if getattr(self, name) not in (None, False)]

    @property
    def source(self) -> str:
        """What is compiled: the schema's text, the regex, the grammar, or the choices as an EBNF grammar."""
        if self.json_object:
            return ""
        if self.choice is not None:  # JSON string literals are EBNF string literals, escapes and all
            return "root ::= " + " | ".join(json.dumps(c) for c in self.choice)
        return getattr(self, self.kind)


class GrammarBackend:
    """xgrammar for one model's tokenizer: compiled grammars (cached) and a matcher per request. Made at once,
    xgrammar imported at the first compile (it brings transformers along); thread-safe, so compiling can run
    off the event loop."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer  # a Tokenizer (its ``backend``, a tokenizers.Tokenizer) or that backend
        self.vocab_size = vocab_size
        self._stop_token_ids = [int(t) for t in stop_token_ids]
        self._lock = threading.Lock()  # making the compiler; xgrammar's compiler is itself thread-safe
        self._compiler = None

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of ``spec`` (xgrammar's compiler caches it, within CACHE_BYTES; compiles run in
        parallel); RequestError (naming ``spec.param``) where xgrammar refuses it (a schema it cannot hold to, a
        regex or grammar that does not parse)."""
        compiler = self._get_compiler()
        try:
            if spec.json_object or spec.json is not None:  # any object: its keys and values left free
                schema, is_strict = (spec.json, True) if spec.json is not None else ('{"type":"object"}', False)
                return compiler.compile_json_schema(schema, any_whitespace=not spec.disable_any_whitespace,
                                                    strict_mode=is_strict)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            return compiler.compile_grammar(spec.source)
        except (RuntimeError, ValueError) as exc:  # xgrammar's parse and schema errors, without its log prefix
            message = _XGRAMMAR_PREFIX.sub("", str(exc).strip())
            raise RequestError(f"the {spec.kind} structured output cannot be compiled: {message}",
                               spec.param) from None

    def matcher(self, spec: StructuredOutputs, allowed_token_ids: Sequence[int] | None = None):
        """A new GrammarMatcher for one request of ``spec``; RequestError where ``allowed_token_ids`` leave none of
        the tokens its grammar may start with."""
        import xgrammar

        matcher = xgrammar.GrammarMatcher(self.compile(spec))
        if allowed_token_ids:
            bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
            matcher.fill_next_token_bitmask(bitmask, 0)
            words = bitmask[0].tolist()
            if not any(words[t // 32] >> (t % 32) & 1 for t in allowed_token_ids if t < self.vocab_size):
                raise RequestError("allowed_token_ids leaves none of the tokens the structured output may start "
                                   "with", "allowed_token_ids")
        return matcher

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                self._compiler = self._make_compiler()
            return self._compiler

    def _make_compiler(self):
        try:
            import xgrammar
            from transformers import PreTrainedTokenizerFast
        except ImportError as exc:  # a dependency, but an install may lack it: the request says so
            raise RequestError(f"structured outputs need the xgrammar package ({exc})", PARAM) from None
        backend = getattr(self._tokenizer, "backend", self._tokenizer)
        info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=backend),
                                                       vocab_size=self.vocab_size,
                                                       stop_token_ids=self._stop_token_ids or None)
        return xgrammar.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)


def matcher_for(grammars: GrammarBackend | None, params: "SamplingParams"):
    """A request's GrammarMatcher (None without structured outputs), one that starts after its
    ``reasoning_end_token_id`` where it has one (``AfterToken``); RequestError where there is no backend, or where
    its allowed_token_ids leave nothing the grammar may start with."""
    spec = params.structured_outputs
    if spec is None:
        return None
    if grammars is None:
        raise RequestError("this engine has no tokenizer to hold outputs to a grammar", spec.param)
    matcher = grammars.matcher(spec, params.allowed_token_ids)
    return matcher if params.reasoning_end_token_id is None else AfterToken(matcher, params.reasoning_end_token_id)


class AfterToken:
    """A GrammarMatcher that holds the output only once ``token_id`` has been generated (a reasoning model's end of
    thinking): until then every token is allowed, and the grammar has not started (nor ended)."""

    def __init__(self, matcher: Any, token_id: int) -> None:
        self.matcher, self.token_id = matcher, token_id
        self.is_started = False

    def fill_next_token_bitmask(self, bitmask: Any, index: int) -> None:
        if self.is_started:
            self.matcher.fill_next_token_bitmask(bitmask, index)

    def accept_token(self, token_id: int) -> bool:
        if self.is_started:
            return self.matcher.accept_token(token_id)
        self.is_started = token_id == self.token_id
        return True

    def is_terminated(self) -> bool:
        return self.is_started and self.matcher.is_terminated()


def apply_bitmasks(logits: "torch.Tensor", matchers: Sequence[Any], eos_token_ids: Sequence[int] = ()) -> None:
    """-inf for every token the grammar of a row does not allow next (rows whose matcher is None are left as they
    are). A row the masks together leave nothing (a complete grammar, whose EOS min_tokens holds back; allowed ids
    the grammar does not allow) may take EOS: the grammar's end wins, and its request ends with "stop"."""
    import torch
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(matchers), logits.shape[1])  # all allowed
    for index, matcher in enumerate(matchers):
        if matcher is not None and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, index)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))
    eos = [t for t in eos_token_ids if 0 <= t < logits.shape[1]]
    if eos:
        for index in torch.isneginf(logits).all(dim=1).nonzero().flatten().tolist():
            if matchers[index] is not None:
                logits[index, eos] = 0.0
