"""Incremental detokenization: UTF-8 split across tokens, byte fallback, stop strings across tokens."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers

from fastdecode.actors.detokenize import Detokenizer
from fastdecode.actors.model.synthetic_tokenizer import build_synthetic_tokenizer
from fastdecode.actors.model.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "héllo wörld — naïve café",
    "emoji 😀🎉 and 日本語 text",
    "  spaces\n\nand\tnewlines  ",
]


@pytest.fixture(scope="module")
def byte_level():
    return Tokenizer(build_synthetic_tokenizer(400), bos_token="<|bos|>", eos_token="<|eos|>")


@pytest.fixture(scope="module")
def byte_fallback():
    """A sentencepiece-style BPE: '▁' for spaces, unknown characters spelled as <0xNN> byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for char in "▁abcdefghijklmnopqrstuvwxyzTFP.,":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "p")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(backend)


def _stream(tokenizer, text, stop=(), prompt_ids=(), min_tokens=0):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(tokenizer, list(prompt_ids), stop=stop, min_tokens=min_tokens)
    pieces, hit_at = [], None
    for index, token_id in enumerate(ids):
        piece, hit = detok.add(token_id)
        pieces.append(piece)
        if hit:
            hit_at = index
            break
    pieces.append(detok.finish())
    assert "".join(pieces) == detok.text
    return ids, pieces, hit_at


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_streamed_text_equals_full_decode_and_never_splits_a_character(kind, text, request):
    tokenizer = request.getfixturevalue(kind)
    ids, pieces, _ = _stream(tokenizer, text)
    assert "".join(pieces) == tokenizer.decode(ids)
    if kind == "byte_level":
        assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_characters_really_span_tokens(byte_level, byte_fallback):
    """Guard for the test above: the characters are split over several tokens, and a piece
    comes out only when the last byte of a character arrives."""
    for tokenizer in (byte_level, byte_fallback):
        ids, pieces, _ = _stream(tokenizer, "😀")
        assert len(ids) >= 4 and tokenizer.decode(ids[:2]).endswith("\ufffd")
        assert pieces[:-2] == [""] * (len(pieces) - 2) and "😀" in "".join(pieces[-2:])


def test_stop_string_across_token_boundaries_is_cut_off(byte_level):
    text = "The capital of France is Paris. It is big."
    ids, pieces, hit_at = _stream(byte_level, text, stop=("Paris.",))
    assert "".join(pieces) == "The capital of France is "
    assert hit_at is not None and hit_at < len(ids) - 1
    # "Paris." spans several tokens ("ĠP", "ar", "is", "."), and none of it was ever emitted
    assert byte_level.decode(ids[:hit_at]).endswith(" Paris")  # decoded one token before the hit...
    assert "P" not in "".join(pieces)  # ...yet never emitted


def test_possible_stop_prefix_is_held_then_released(byte_level):
    detok = Detokenizer(byte_level, [], stop=("STOP",))
    emitted = []
    for token_id in byte_level.encode("a STOx STOP", add_special_tokens=False):
        piece, hit = detok.add(token_id)
        emitted.append(piece)
        if "".join(emitted).endswith("ST"):
            raise AssertionError("text that may begin the stop string must be held back")
        if hit:
            break
    assert detok.text == "a STOx " and detok.is_stopped
    assert detok.add(5) == ("", True)


def test_held_text_is_released_at_the_end(byte_level):
    ids, pieces, hit_at = _stream(byte_level, "ends with ST", stop=("STOP",))
    assert hit_at is None and "".join(pieces) == "ends with ST" and pieces[-1].endswith("ST")


def test_earliest_of_several_stop_strings_wins(byte_level):
    _, pieces, hit_at = _stream(byte_level, "one two three four", stop=("four", "three", "e t"))
    assert hit_at is not None and "".join(pieces) == "on"


def test_stop_string_in_the_first_min_tokens_is_not_searched(byte_level):
    """vLLM: the text of the first min_tokens tokens is never searched; it flows on."""
    _, pieces, hit_at = _stream(byte_level, "a3b3c", stop=("3",), min_tokens=2)  # tokens a 3 b 3 c
    assert hit_at == 3 and "".join(pieces) == "a3b" and "3" in "".join(pieces[:2])
    _, pieces, hit_at = _stream(byte_level, "a3b3c", stop=("3",), min_tokens=1)
    assert hit_at == 1 and "".join(pieces) == "a"


def test_stop_string_begun_before_min_tokens_matches_when_it_ends_after(byte_level):
    """The search looks back len(stop) - 1 characters into the unsearched text (vLLM's look-back)."""
    text = "xy. STOP. STOP."  # tokens x y . ␣S T O P . ␣S T O P .
    _, pieces, hit_at = _stream(byte_level, text, stop=("STOP",), min_tokens=5)  # "STOP" ends in token 7
    assert hit_at == 6 and "".join(pieces) == "xy. "
    _, pieces, hit_at = _stream(byte_level, text, stop=("STOP",), min_tokens=7)  # the first "STOP" is unsearched
    assert hit_at == 11 and "".join(pieces) == "xy. STOP. "


def test_unsearched_text_held_back_stays_unsearched(byte_level):
    """The text "STO" is held back as a possible start of "STOP!" while the threshold passes: the "O" in it,
    from the first min_tokens tokens, must not match later."""
    _, pieces, hit_at = _stream(byte_level, "xy. STOP. STOP.", stop=("STOP!", "O"), min_tokens=6)
    assert hit_at == 10 and "".join(pieces) == "xy. STOP. ST"


def test_special_tokens_are_skipped_and_prompt_gives_context(byte_fallback):
    ids = byte_fallback.encode("the cap", add_special_tokens=False)
    detok = Detokenizer(byte_fallback, ids[:1])  # "▁the" from the prompt: the next word keeps its space
    text = "".join(detok.add(t)[0] for t in ids[1:]) + detok.finish()
    assert text == " cap"
    detok = Detokenizer(byte_fallback, [])
    assert detok.add(2) == ("", False) and detok.finish() == ""


def test_empty_stop_string_is_refused(byte_level):
    with pytest.raises(ValueError):
        Detokenizer(byte_level, [], stop=("",))
