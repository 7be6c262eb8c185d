"""The reasoning split (``reasoning_parsers``): what each parser calls reasoning and content in a whole text, and
that any split of the text into stream pieces gives the same."""
from __future__ import annotations

import pytest

from fastdecode.actors.reasoning_parsers import ThinkSplit
from text_splits import cut_lists

CASES = [
    # (parser, text, reasoning, content)
    ("deepseek_r1", "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n", "\n\nThe answer is 4."),
    ("deepseek_r1", "<think>hmm</think>4", "hmm", "4"),
    ("deepseek_r1", "  <think>hmm</think>4", "hmm", "4"),
    ("deepseek_r1", "still thinking when max_tokens came </thi", "still thinking when max_tokens came </thi", ""),
    ("deepseek_r1", "a < b, and </think> so", "a < b, and ", " so"),
    ("deepseek_r1", "", "", ""),
    ("qwen3", "<think>\nhmm\n</think>\n\nHi!", "\nhmm\n", "\n\nHi!"),
    ("qwen3", "Hi! No thinking here.", "", "Hi! No thinking here."),
    ("qwen3", "<thin", "", "<thin"),  # a start tag that never came is content
    ("qwen3", "<think>cut off", "cut off", ""),
    ("qwen3", "2 < 3 </think> is text", "", "2 < 3 </think> is text"),
]


def streamed(parser: str, text: str, cuts: list[int]) -> tuple[str, str]:
    split, reasoning, content, bounds = ThinkSplit(parser), "", "", [0, *cuts, len(text)]
    for start, end in zip(bounds, bounds[1:]):
        r, c = split.feed(text[start:end])
        reasoning, content = reasoning + r, content + c
    r, c = split.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("parser, text, reasoning, content", CASES)
def test_a_whole_text_and_every_split_of_it(parser, text, reasoning, content):
    assert streamed(parser, text, []) == (reasoning, content)  # the whole text at once
    for cuts in cut_lists(text, num_random=30, max_pieces=10):
        assert streamed(parser, text, cuts) == (reasoning, content), cuts


def test_reasoning_streams_before_the_block_closes():
    split = ThinkSplit("deepseek_r1")
    assert split.feed("First, ") == ("First, ", "")
    assert split.feed("add.</th") == ("add.", "")  # the end tag's start held back
    assert split.feed("ink>4") == ("", "4")
    assert split.feed(" is it") == ("", " is it")


def test_an_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        ThinkSplit("r2")
