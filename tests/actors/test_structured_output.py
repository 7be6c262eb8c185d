"""Structured outputs (vLLM's ``structured_outputs``, OpenAI's ``response_format``): random:tiny's output, which
left alone is no JSON at all, is held to a JSON schema, any JSON object, a regex, a choice or an EBNF grammar by
xgrammar's token masks, greedy and sampled, and ends with "stop" once the grammar is complete."""
from __future__ import annotations

import json
import re

import pytest
import torch

from api_helpers import PROMPT, llm  # noqa: F401 (llm: a fixture)
from fastdecode.actors.model.synthetic_tokenizer import build_synthetic_tokenizer
from fastdecode.actors.request import RequestError, SamplingParams
from fastdecode.actors.sampling import SamplingRow, sample
from fastdecode.actors.structured_output import GrammarBackend, StructuredOutputs

EOS = 319  # random:tiny's <|eos|>
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def test_specs_take_exactly_one_kind_and_hash_by_content():
    assert StructuredOutputs(json=SCHEMA) == StructuredOutputs(json=json.dumps(SCHEMA, indent=2))
    assert hash(StructuredOutputs(choice=["a", "b"])) == hash(StructuredOutputs(choice=("a", "b")))
    assert StructuredOutputs(choice=["yes", 'say "no"']).source == 'root ::= "yes" | "say \\"no\\""'
    for fields in ({}, {"regex": "a", "choice": ["a"]}, {"json": "{not json"}, {"json": [1]}, {"choice": "ab"},
                   {"choice": []}, {"regex": ""}, {"json_object": "yes"}):
        with pytest.raises(RequestError) as refused:
            StructuredOutputs(**fields)
        assert refused.value.param == "structured_outputs"
    params = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert params.structured_outputs == StructuredOutputs(regex="[0-9]+")
    with pytest.raises(RequestError, match="unexpected keyword"):
        SamplingParams(structured_outputs={"jsonn": SCHEMA})


def test_a_grammar_that_does_not_compile_is_a_request_error():
    backend = GrammarBackend(build_synthetic_tokenizer(320), 320, [EOS])
    for spec in (StructuredOutputs(regex="(unclosed"), StructuredOutputs(grammar="root ::= missing_rule")):
        with pytest.raises(RequestError) as refused:
            backend.compile(spec)
        assert refused.value.param == "structured_outputs" and "cannot be compiled" in str(refused.value)


def test_the_mask_leaves_what_the_grammar_allows_in_a_mixed_batch():
    tokenizer = build_synthetic_tokenizer(320)
    backend = GrammarBackend(tokenizer, 320, [EOS])
    matcher = backend.matcher(StructuredOutputs(choice=["yes", "no"]))
    logits = torch.randn(2, 320, generator=torch.Generator().manual_seed(0))
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1], [], matcher=matcher),
            SamplingRow(SamplingParams(temperature=0.0), [1], [])]
    assert not rows[0].is_argmax and rows[1].is_argmax
    first = tokenizer.id_to_token(int(sample(logits, rows).token_ids[0]))
    assert first in ("y", "n", "ye", "no") and int(sample(logits, rows).token_ids[1]) == int(logits[1].argmax())


async def _text(llm, params: SamplingParams) -> tuple[str, str]:
    result = await llm.generate(PROMPT, params)
    return result.text, result.finish_reason


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_the_engine_holds_the_output_to_each_kind(llm, temperature):
    base = dict(temperature=temperature, seed=3, max_tokens=120)
    compact = {"json": SCHEMA, "disable_any_whitespace": True}  # else a random model may pad with spaces for ever
    text, reason = await _text(llm, SamplingParams(**base, structured_outputs=compact))
    value = json.loads(text, strict=False)  # JSON only because the mask leaves nothing else (strings may hold
    # control characters: xgrammar's JSON strings allow them)
    assert reason == "stop" and set(value) == {"name", "age"} and 0 <= value["age"] <= 150
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    text, reason = await _text(llm, SamplingParams(**base, structured_outputs={"choice": ["alpha", "beta 2"]}))
    assert (text, reason) in (("alpha", "stop"), ("beta 2", "stop"))
    text, reason = await _text(llm, SamplingParams(**base, structured_outputs={"regex": "[0-9]{3}-[a-c]+x"}))
    assert re.fullmatch("[0-9]{3}-[a-c]+x", text) and reason == "stop"
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z] | "z9"'
    text, reason = await _text(llm, SamplingParams(**base, structured_outputs={"grammar": grammar}))
    assert re.fullmatch(r"\((?:[a-z]|z9)(?:,(?:[a-z]|z9))*\)", text) and reason == "stop"


async def test_json_object_and_a_free_run_beside_it(llm):
    """Any JSON object, while a plain request runs in the same batch unmasked (its text is no JSON)."""
    import asyncio

    held = SamplingParams(temperature=0.0, max_tokens=200,
                          structured_outputs={"json_object": True, "disable_any_whitespace": True})
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (text, reason), free_result = await asyncio.gather(_text(llm, held), llm.generate(PROMPT, free))
    assert reason == "stop" and isinstance(json.loads(text, strict=False), dict)
    with pytest.raises(ValueError):
        json.loads(free_result.text)


async def test_a_bad_spec_is_refused_before_anything_runs(llm):
    with pytest.raises(RequestError) as refused:
        await llm.generate(PROMPT, SamplingParams(structured_outputs={"regex": "(("}))
    assert refused.value.param == "structured_outputs"
    assert len((await llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3))).token_ids) == 3


async def test_the_engine_matches_the_reference_under_a_grammar(llm):
    """Greedy under a regex, token for token the reference's (which holds to it the same way)."""
    from fastdecode.actors.reference import reference_generate

    params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs={"regex": "[a-f]{2,9}\\.[0-9]"})
    ours = await llm.generate(PROMPT, params)
    model = llm.cluster.model
    reference = reference_generate(model, llm.tokenizer, PROMPT, params)
    assert (ours.token_ids, ours.text, ours.finish_reason) == (reference.token_ids, reference.text, "stop")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_grammar_mask_picks_what_the_cpu_picks():
    """The bitmask applied to logits on the GPU (xgrammar's kernel) against the CPU: greedy rows under a regex and
    a JSON grammar, a plain row between them, for a few steps."""
    tokenizer = build_synthetic_tokenizer(320)
    backend = GrammarBackend(tokenizer, 320, [EOS])
    specs = [StructuredOutputs(regex="[a-f]{3}[0-9]{9}"), None, StructuredOutputs(json_object=True)]
    generator = torch.Generator().manual_seed(5)
    picked = {}
    for device in ("cpu", "cuda"):
        matchers = [spec and backend.matcher(spec) for spec in specs]
        outputs = [[] for _ in specs]
        rows = [SamplingRow(SamplingParams(temperature=0.0), [1], out, matcher=matcher)
                for out, matcher in zip(outputs, matchers)]
        generator.manual_seed(5)
        for _ in range(6):
            logits = torch.randn(3, 320, generator=generator).to(device)
            for out, m, token in zip(outputs, matchers, sample(logits, rows).token_ids.tolist()):
                out.append(token)
                if m is not None and not m.is_terminated():  # a terminated one has ended its request
                    assert m.accept_token(token)
        picked[device] = outputs
    assert picked["cuda"] == picked["cpu"]


def test_a_schema_keeps_its_key_order_and_the_cache_is_bounded():
    """The model writes an object's keys in the schema's order (reasoning before answer), so the spec keeps it; the
    compiled grammars are xgrammar's cache's, within CACHE_BYTES, not kept for ever."""
    from fastdecode.actors.structured_output import CACHE_BYTES

    spec = StructuredOutputs(json={"type": "object", "properties": {"reasoning": {}, "answer": {}}})
    assert spec.json.index("reasoning") < spec.json.index("answer")
    backend = GrammarBackend(build_synthetic_tokenizer(320), 320, [EOS])
    backend.compile(spec)
    assert backend._get_compiler().cache_limit_bytes == CACHE_BYTES


async def test_a_schemas_keys_come_in_its_order(llm):
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    text, reason = await _text(llm, SamplingParams(temperature=0.0, max_tokens=60, structured_outputs={
        "json": schema, "disable_any_whitespace": True}))
    assert reason == "stop" and list(json.loads(text)) == ["zeta", "alpha"]


async def test_min_tokens_gives_way_to_a_complete_grammar(llm):
    """A complete grammar allows only EOS, which min_tokens holds back: nothing could be sampled, and the engine
    drew token 0. The grammar's end wins: the request ends with "stop" and its choice, stop_reason None (EOS),
    ignore_eos or not."""
    for ignore_eos in (False, True):
        params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=15, ignore_eos=ignore_eos,
                                skip_special_tokens=False, structured_outputs={"choice": ["alpha", "beta"]})
        result = await llm.generate(PROMPT, params)
        assert result.text in ("alpha", "beta") and result.finish_reason == "stop" and result.stop_reason is None
        assert 0 not in result.token_ids and result.token_ids[-1] == EOS


async def test_allowed_ids_that_the_grammar_cannot_start_with_are_refused(llm):
    digits = SamplingParams(structured_outputs={"regex": "[0-9]+"}, allowed_token_ids=[72, 101])  # "H", "e"
    with pytest.raises(RequestError) as refused:
        await llm.generate(PROMPT, digits)
    assert refused.value.param == "allowed_token_ids" and "may start with" in str(refused.value)


def test_the_compiled_grammars_stay_within_the_cache_limit(monkeypatch):
    """A client sending a new schema with every request must not grow the server without bound (each took some
    MB, kept for ever): xgrammar's cache drops the least recently used past the limit."""
    import fastdecode.actors.structured_output as structured

    monkeypatch.setattr(structured, "CACHE_BYTES", 1 << 20)
    backend = GrammarBackend(build_synthetic_tokenizer(320), 320, [EOS])
    for i in range(40):
        properties = {f"key{i}_{j}": {"type": "string"} for j in range(20)}
        backend.compile(StructuredOutputs(json={"type": "object", "properties": properties}))
    assert 0 < backend._get_compiler().get_cache_size_bytes() <= 1 << 20


class _Matcher:
    """A stand-in GrammarMatcher that counts what reaches it."""

    def __init__(self) -> None:
        self.accepted, self.filled = [], 0

    def fill_next_token_bitmask(self, bitmask, index):
        self.filled += 1

    def accept_token(self, token_id):
        self.accepted.append(token_id)
        return True

    def is_terminated(self):
        return len(self.accepted) >= 2


def test_a_grammar_after_a_token_starts_once_that_token_came():
    from fastdecode.actors.structured_output import AfterToken

    inner = _Matcher()
    matcher = AfterToken(inner, 7)
    for token_id in (3, 4):  # the thinking: free
        matcher.fill_next_token_bitmask(None, 0)
        assert matcher.accept_token(token_id) and not matcher.is_terminated()
    matcher.accept_token(7)  # the end of thinking
    assert (inner.accepted, inner.filled) == ([], 0)
    matcher.fill_next_token_bitmask(None, 0)
    matcher.accept_token(5)
    matcher.accept_token(6)
    assert (inner.accepted, inner.filled, matcher.is_terminated()) == ([5, 6], 1, True)


async def test_the_engine_holds_the_output_after_the_reasoning_end_token(llm):
    """A reasoning model's structured output holds its answer, after the thinking: here token T ends the
    "thinking", and a bias makes the model write T first, which the regex alone would never allow."""
    regex = "[0-9]{3}"
    end_id = llm.tokenizer.encode("x", add_special_tokens=False)[-1]
    base = dict(temperature=0.0, max_tokens=20, logit_bias={end_id: 100.0}, structured_outputs={"regex": regex})
    after = await llm.generate(PROMPT, SamplingParams(**base, reasoning_end_token_id=end_id))
    assert after.token_ids[0] == end_id and after.finish_reason == "stop"
    assert re.fullmatch(regex, llm.tokenizer.decode(after.token_ids[1:]))
    held = await llm.generate(PROMPT, SamplingParams(**base))  # from the first token: T is never allowed
    assert end_id not in held.token_ids and re.fullmatch(regex, held.text)
    with pytest.raises(RequestError) as refused:
        await llm.generate(PROMPT, SamplingParams(**base, reasoning_end_token_id=10**6))
    assert refused.value.param == "reasoning_end_token_id"
    from fastdecode.actors.reference import reference_generate

    reference = reference_generate(llm.cluster.model, llm.tokenizer, PROMPT,
                                   SamplingParams(**base, reasoning_end_token_id=end_id))
    assert reference.token_ids == after.token_ids
