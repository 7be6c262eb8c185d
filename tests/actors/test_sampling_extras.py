"""vLLM's remaining SamplingParams fields: include_stop_str_in_output, skip_special_tokens,
spaces_between_special_tokens, truncate_prompt_tokens, allowed_token_ids and bad_words. Checked on their own (the
params, the sampler, the detokenizer), then through AsyncLLM on random:tiny against the reference engine."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from api_helpers import PROMPT, llm  # noqa: F401 (llm: a fixture)
from fastdecode.actors.api_inputs import TokenizedPrompt
from fastdecode.actors.detokenize import Detokenizer
from fastdecode.actors.executor_config import check_prompt
from fastdecode.actors.model.attention import TorchKVCache
from fastdecode.actors.model.synthetic_tokenizer import build_synthetic_tokenizer
from fastdecode.actors.model.tokenizer import Tokenizer
from fastdecode.actors.reference import reference_generate, run_tokens
from fastdecode.actors.request import MAX_BAD_WORDS, RequestError, SamplingParams, truncate_prompt
from fastdecode.actors.sampling import SamplingRow, make_generator, sample

BOS, EOS, THREE = 318, 319, 51  # random:tiny's <|bos|>, <|eos|> and "3" (greedy after PROMPT: n ? _ " h" 3 L 3 ...)
GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def byte_level():
    return Tokenizer(build_synthetic_tokenizer(400), bos_token="<|bos|>", eos_token="<|eos|>")


# ---- the params -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param", [
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"skip_special_tokens": None}, "skip_special_tokens"),
    ({"spaces_between_special_tokens": "no"}, "spaces_between_special_tokens"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -1]}, "allowed_token_ids"),
    ({"allowed_token_ids": 5}, "allowed_token_ids"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": ["a", ""]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
])
def test_bad_values_are_refused_naming_the_field(fields, param):
    with pytest.raises(RequestError) as refused:
        SamplingParams(**fields)
    assert refused.value.param == param


def test_allowed_ids_and_bad_words_are_stored_once_each():
    params = SamplingParams(allowed_token_ids=[9, 3, 9, 1], bad_words=["b", "a", "b"])
    assert params.allowed_token_ids == (1, 3, 9) and params.bad_words == ("b", "a")
    assert SamplingParams().allowed_token_ids is None and SamplingParams().bad_words == ()


def test_truncation_keeps_the_prompt_end_as_vllm():
    ids = list(range(10))
    assert truncate_prompt(ids, 3, 100, 16) == [7, 8, 9]
    assert truncate_prompt(ids, 30, 100, 16) == ids and truncate_prompt(ids, None, 4, 16) == ids
    assert truncate_prompt(ids, -1, 14, 10) == [6, 7, 8, 9]  # -1: what max_tokens leaves of the context
    assert truncate_prompt(ids, -1, 8, None) == ids[2:]  # max_tokens None leaves all of it
    with pytest.raises(RequestError) as refused:
        truncate_prompt(ids, 5, 20, 16)  # 20 - 16 = 4 tokens of room
    assert refused.value.param == "truncate_prompt_tokens"
    assert SamplingParams(max_tokens=2, truncate_prompt_tokens=-1).truncated_prompt(ids, 5) == [7, 8, 9]


def test_bad_words_are_tokenized_with_and_without_a_leading_space(byte_level):
    h, space_h = byte_level.encode("h", add_special_tokens=False), byte_level.encode(" h", add_special_tokens=False)
    three, space_three = (byte_level.encode(w, add_special_tokens=False) for w in ("3", " 3"))
    assert len(h) == len(space_h) == 1 and h != space_h and len(space_three) == 2
    params = SamplingParams(bad_words=["h", "3"]).with_bad_words_token_ids(byte_level)
    # " 3" is two tokens where "3" is one: a new first token of another length is not added (vLLM's rule)
    assert params.bad_words_token_ids == (tuple(h), tuple(space_h), tuple(three))
    assert params.samples()[0].bad_words_token_ids == params.bad_words_token_ids  # kept by every copy
    with pytest.raises(RequestError) as refused:
        SamplingParams(bad_words=["  "]).with_bad_words_token_ids(byte_level)
    assert refused.value.param == "bad_words"
    with pytest.raises(RequestError, match="too many"):
        SamplingParams(bad_words=[f"w{i}" for i in range(MAX_BAD_WORDS)]).with_bad_words_token_ids(byte_level)


def test_submission_refuses_unknown_allowed_ids_and_untokenized_bad_words():
    with pytest.raises(RequestError) as refused:
        check_prompt([1, 2], 50, 64, SamplingParams(allowed_token_ids=[3, 50]))
    assert refused.value.param == "allowed_token_ids"
    check_prompt([1, 2], 50, 64, SamplingParams(allowed_token_ids=[3, 49]))
    with pytest.raises(RequestError) as refused:
        check_prompt([1, 2], 50, 64, SamplingParams(bad_words=["x"]))
    assert refused.value.param == "bad_words"


# ---- the sampler ------------------------------------------------------------------------------------------------
def _row(output=(), **fields) -> SamplingRow:
    return SamplingRow(SamplingParams(**fields), [1], list(output))


def test_allowed_ids_mask_greedy_and_sampled_rows_of_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[:, 7] = 10.0  # every row's best token
    allowed = [3, 11, 40]
    rows = [_row(temperature=0.0, allowed_token_ids=allowed), _row(temperature=0.0),
            _row(temperature=1.0, allowed_token_ids=allowed), _row(temperature=1.0, allowed_token_ids=[7, 8])]
    assert not rows[0].is_argmax and rows[1].is_argmax
    best_allowed = max(allowed, key=lambda t: logits[0, t])
    draws = [sample(logits, rows, generator=torch.Generator().manual_seed(seed)).token_ids.tolist()
             for seed in range(40)]
    assert {d[0] for d in draws} == {best_allowed} and {d[1] for d in draws} == {7}
    assert {d[2] for d in draws} <= set(allowed) and len({d[2] for d in draws}) > 1
    assert {d[3] for d in draws} <= {7, 8}
    raw = sample(logits[:1], [_row(temperature=0.0, allowed_token_ids=allowed, logprobs=0)])
    assert raw.logprobs[0] == logits[0].log_softmax(-1)[best_allowed]  # logprobs stay the model's raw ones


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_masks_pick_what_the_cpu_picks():
    """allowed_token_ids and bad words on the GPU (the mask built on the device, the ids uploaded) against the CPU
    on the same logits: greedy rows and a sampled one whose top_k of 1 leaves one token, with a plain row between."""
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(3)) * 3
    best = [int(t) for t in logits[0].topk(3).indices]

    def rows(device: str) -> list[SamplingRow]:
        banned = SamplingParams(temperature=0.0, bad_words=["x"])
        object.__setattr__(banned, "_bad_words_token_ids", ((best[0],), (5, best[1])))
        params = [SamplingParams(temperature=0.0, allowed_token_ids=[17, 2999, best[2]], logprobs=2),
                  SamplingParams(temperature=0.0), banned,
                  SamplingParams(temperature=0.9, seed=4, top_k=1, allowed_token_ids=list(range(100, 3000, 7)))]
        return [SamplingRow(p, [1], [5], make_generator(p.seed, device)) for p in params]

    on_cpu, on_gpu = sample(logits, rows("cpu")), sample(logits.cuda(), rows("cuda"))
    assert on_gpu.token_ids.tolist() == on_cpu.token_ids.tolist()
    assert on_cpu.token_ids[0] == best[2] and on_cpu.token_ids[2] not in best[:2]
    assert on_cpu.token_ids[3] in range(100, 3000, 7)
    torch.testing.assert_close(on_gpu.logprobs.cpu(), on_cpu.logprobs, rtol=0, atol=1e-4)


def test_bad_words_ban_their_last_token_after_the_rest_of_them():
    logits = torch.zeros(3, 20)
    logits[:, 9] = 5.0
    logits[:, 4] = 4.0
    words = SamplingParams(temperature=0.0, bad_words=["x"])
    object.__setattr__(words, "_bad_words_token_ids", ((2, 9), (4,)))  # as a tokenizer would give them
    rows = [SamplingRow(words, [1], [5, 2]), SamplingRow(words, [1], [2, 5]), _row(temperature=0.0)]
    assert rows[0].banned_token_ids() == [9, 4] and rows[1].banned_token_ids() == [4]
    assert sample(logits, rows).token_ids.tolist() == [0, 9, 9]  # 9 and 4 banned; only 4; nothing


# ---- the detokenizer --------------------------------------------------------------------------------------------
def _pieces(tokenizer, text, **options):
    detok = Detokenizer(tokenizer, [], **options)
    pieces = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        piece, is_stopped = detok.add(token_id)
        pieces.append(piece)
        if is_stopped:
            break
    pieces.append(detok.finish())
    assert "".join(pieces) == detok.text
    return pieces, detok


def test_a_kept_stop_string_ends_the_text_and_nothing_is_held_back(byte_level):
    text = "The capital of France is Paris."
    cut, detok = _pieces(byte_level, text, stop=("Paris",))  # " P", "ar", "is"
    kept, kept_detok = _pieces(byte_level, text, stop=("Paris",), include_stop_str_in_output=True)
    assert detok.text == "The capital of France is " and kept_detok.text == "The capital of France is Paris"
    assert kept_detok.stop_string == "Paris" and kept_detok.is_stopped
    # streamed as decoded (vLLM holds nothing back then): the stop string's start came before it was complete
    assert kept[-4:] == [" P", "ar", "is", ""]
    assert cut[-4:] == [" ", "", "", ""]
    _, later = _pieces(byte_level, "ab cd ef", stop=("d e", "zz"), include_stop_str_in_output=True)
    assert later.text == "ab cd e" and later.stop_string == "d e"  # begun in text already returned


def test_a_stop_token_text_is_kept_with_include_stop_str_in_output(byte_level):
    """The engine stopped on a stop token: its text is left out, or kept with include_stop_str_in_output, where it
    may complete a stop string (which then is the stop_reason, as in vLLM)."""
    ids = byte_level.encode("ab3", add_special_tokens=False)
    for is_kept, expected, stop_string in ((False, "ab", None), (True, "ab3", "b3")):
        detok = Detokenizer(byte_level, [], include_stop_str_in_output=is_kept, stop=("b3",))
        pieces = [detok.add(token_id)[0] for token_id in ids[:-1]]
        pieces.append(detok.finish(ids[-1]))
        assert "".join(pieces) == detok.text == expected and detok.stop_string == stop_string


def test_special_tokens_show_only_when_not_skipped(byte_level):
    eos = byte_level.eos_token_ids[-1]
    for skip, expected in ((True, "hi"), (False, "hi<|eos|><|eos|>")):
        detok = Detokenizer(byte_level, [], skip_special_tokens=skip)
        for token_id in [*byte_level.encode("hi", add_special_tokens=False), eos, eos]:
            detok.add(token_id)
        assert detok.text + detok.finish() == expected


def test_spaces_between_special_tokens_false_joins_added_tokens_as_vllm():
    """A WordPiece decoder puts a space between tokens, added ones too; vLLM's fast detokenizer shows an added token
    right after another as its bare text when spaces_between_special_tokens is False."""
    vocab = {"[UNK]": 0, "hi": 1, "there": 2, "[A]": 3, "[B]": 4}
    backend = BackendTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(["[A]", "[B]"])
    tokenizer = Tokenizer(backend)
    ids = [1, 3, 4, 3, 2]
    texts = {}
    for spaces in (True, False):
        detok = Detokenizer(tokenizer, [], skip_special_tokens=False, spaces_between_special_tokens=spaces)
        texts[spaces] = "".join(detok.add(token_id)[0] for token_id in ids) + detok.finish()
    assert texts[True] == "hi [A] [B] [A] there" and texts[False] == "hi [A][B][A] there"
    skipped = Detokenizer(tokenizer, [], spaces_between_special_tokens=False)  # only acts on shown special tokens
    assert "".join(skipped.add(token_id)[0] for token_id in ids) + skipped.finish() == "hi there"


# ---- the engine against the reference ---------------------------------------------------------------------------
def _best_first_token(model, allowed) -> int:
    cache = TorchKVCache.for_model(model)
    cache.allocate(0)
    logits = model.logits(run_tokens(model, cache, 0, PROMPT, 0)[-1:])[0]
    return max(allowed, key=lambda t: logits[t])


async def _same_as_reference(llm, tiny_model, params, prompt=PROMPT):
    model, tokenizer = tiny_model
    ours = await llm.generate(prompt, params)
    reference = reference_generate(model, tokenizer, prompt, params)
    assert (ours.token_ids, ours.text, ours.finish_reason) == (reference.token_ids, reference.text,
                                                               reference.finish_reason)
    return ours, reference


async def test_allowed_token_ids_in_the_engine(llm, tiny_model):
    free, _ = await _same_as_reference(llm, tiny_model, SamplingParams(**GREEDY))
    allowed = [72, 101, 111, 302]
    ours, _ = await _same_as_reference(llm, tiny_model, SamplingParams(**GREEDY, allowed_token_ids=allowed))
    assert set(ours.token_ids) <= set(allowed) and not set(free.token_ids) <= set(allowed)
    assert ours.token_ids[0] == _best_first_token(tiny_model[0], allowed)  # greedy: the likeliest allowed one
    sampled = await llm.generate(PROMPT, SamplingParams(temperature=1.5, seed=5, max_tokens=20, ignore_eos=True,
                                                        allowed_token_ids=allowed))
    assert set(sampled.token_ids) <= set(allowed) and len(set(sampled.token_ids)) > 1
    with pytest.raises(RequestError) as refused:
        await llm.generate(PROMPT, SamplingParams(allowed_token_ids=[tiny_model[0].config.vocab_size]))
    assert refused.value.param == "allowed_token_ids"


async def test_stop_strings_and_tokens_kept_in_the_engine(llm, tiny_model):
    for stop in ({"stop": ("h3",)}, {"stop_token_ids": (THREE,)}):
        kept, _ = await _same_as_reference(llm, tiny_model,
                                           SamplingParams(**GREEDY, **stop, include_stop_str_in_output=True))
        cut, _ = await _same_as_reference(llm, tiny_model, SamplingParams(**GREEDY, **stop))
        assert kept.text.endswith(" h3") and kept.text == cut.text + ("h3" if "stop" in stop else "3")
        assert kept.finish_reason == "stop" and kept.stop_reason == stop.get("stop", (THREE,))[0]
    streamed = [out.text async for out in llm.stream(PROMPT, SamplingParams(**GREEDY, stop=("h3",),
                                                                            include_stop_str_in_output=True))]
    assert "".join(streamed) == kept.text


async def test_special_tokens_in_the_engine_text(llm, tiny_model):
    shown, _ = await _same_as_reference(llm, tiny_model, SamplingParams(
        **GREEDY, allowed_token_ids=[BOS, 72], skip_special_tokens=False))
    skipped, _ = await _same_as_reference(llm, tiny_model, SamplingParams(**GREEDY, allowed_token_ids=[BOS, 72]))
    assert BOS in shown.token_ids and shown.token_ids == skipped.token_ids
    assert "<|bos|>" in shown.text and skipped.text == shown.text.replace("<|bos|>", "")
    eos_kept, _ = await _same_as_reference(llm, tiny_model, SamplingParams(
        temperature=0.0, max_tokens=8, allowed_token_ids=[EOS, 72], skip_special_tokens=False,
        include_stop_str_in_output=True))
    assert eos_kept.token_ids == [EOS] and eos_kept.text == "<|eos|>" and eos_kept.stop_reason is None


async def test_truncated_prompts_in_the_engine(llm, tiny_model):
    model, tokenizer = tiny_model
    params = SamplingParams(**GREEDY, truncate_prompt_tokens=2)
    ours = [out.token_id async for out in llm.stream(PROMPT, params)]
    reference = reference_generate(model, tokenizer, PROMPT, params)
    assert reference.prompt_token_ids == PROMPT[-2:]
    assert ours == reference.token_ids == reference_generate(model, tokenizer, PROMPT[-2:],
                                                             SamplingParams(**GREEDY)).token_ids
    assert llm.tokenize(PROMPT, params) == TokenizedPrompt(PROMPT[-2:])
    generated = await llm.generate(PROMPT, params)  # vLLM's RequestOutput shows the prompt that ran
    assert (generated.prompt_token_ids, generated.token_ids) == (PROMPT[-2:], reference.token_ids)
    assert (await llm._tokenize_off_loop("Hello there", params)).token_ids == tokenizer.encode("Hello there")[-2:]
    context = llm.max_model_len
    too_long = TokenizedPrompt([72] * (context + 5))
    with pytest.raises(RequestError):
        llm.check_prompt(too_long, SamplingParams(**GREEDY))
    llm.check_prompt(too_long, SamplingParams(**GREEDY, truncate_prompt_tokens=-1))  # cut to context - 12
    long_run = [out.token_id async for out in llm.stream(too_long.token_ids, SamplingParams(
        **GREEDY, truncate_prompt_tokens=-1))]
    assert long_run == reference_generate(model, tokenizer, too_long.token_ids[-(context - 12):],
                                          SamplingParams(**GREEDY)).token_ids


async def test_bad_words_in_the_engine(llm, tiny_model):
    ours, _ = await _same_as_reference(llm, tiny_model, SamplingParams(**GREEDY, bad_words=["3"]))
    assert THREE not in ours.token_ids
    free, _ = await _same_as_reference(llm, tiny_model, SamplingParams(**GREEDY))
    # a two-token word: its second token is banned right after its first (" h" then "3": the free run's 4th, 5th)
    assert len(tiny_model[1].encode(" h3", add_special_tokens=False)) == 2 and free.text.count(" h3") == 1
    word, _ = await _same_as_reference(llm, tiny_model, SamplingParams(**GREEDY, bad_words=[" h3"]))
    assert " h3" not in word.text and word.token_ids[:4] == free.token_ids[:4] and word.token_ids[4] != THREE


async def test_submit_and_text_streams_truncate_and_ban_as_generate(llm, tiny_model):
    model, tokenizer = tiny_model
    params = SamplingParams(**GREEDY, truncate_prompt_tokens=2, bad_words=["3"])
    reference = reference_generate(model, tokenizer, PROMPT, params)
    assert reference.prompt_token_ids == PROMPT[-2:] and THREE not in reference.token_ids
    submitted = llm.submit(PROMPT, params)  # submitted at once: truncated and its bad words tokenized first
    try:
        assert [out.token_id async for out in submitted] == reference.token_ids
    finally:
        await submitted.aclose()
    long_text = "hi " * llm.max_prompt_chars  # past what could fit: refused untokenized unless truncated
    with pytest.raises(RequestError) as refused:
        [out async for out in llm.stream(long_text, SamplingParams(**GREEDY))]
    assert refused.value.param == "prompt"
    kept = SamplingParams(**GREEDY, truncate_prompt_tokens=4)
    streamed = [out.token_id async for out in llm.stream(long_text, kept)]
    assert streamed == reference_generate(model, tokenizer, tokenizer.encode(long_text)[-4:],
                                          SamplingParams(**GREEDY)).token_ids


def test_allowed_ids_that_leave_nothing_to_sample_are_refused(tiny_model):
    eos = (EOS,)
    check_prompt(PROMPT, 320, 64, SamplingParams(allowed_token_ids=[EOS, 72], min_tokens=2), eos)
    check_prompt(PROMPT, 320, 64, SamplingParams(allowed_token_ids=[EOS]), eos)  # EOS may end it at once
    banned = SamplingParams(allowed_token_ids=[THREE], bad_words=["3"]).with_bad_words_token_ids(tiny_model[1])
    for params in (SamplingParams(allowed_token_ids=[EOS], min_tokens=1),
                   SamplingParams(allowed_token_ids=[72, EOS], stop_token_ids=[72], min_tokens=1, ignore_eos=True),
                   banned):
        with pytest.raises(RequestError) as refused:
            check_prompt(PROMPT, 320, 64, params, eos)
        assert refused.value.param == "allowed_token_ids" and "no token to sample" in str(refused.value)
