"""Ways to cut a text into stream pieces, for the tests that a streamed reading shows what a whole one shows."""
from __future__ import annotations

import random
from collections.abc import Iterator


def cut_lists(text: str, *, num_random: int, max_pieces: int, is_char_by_char: bool = False) -> Iterator[list[int]]:
    """The cut positions of: each single cut, ``num_random`` random sets of 2 to ``max_pieces`` - 1 cuts (seeded by
    the text's length), and, where asked, a cut after every character."""
    for cut in range(len(text) + 1):
        yield [cut]
    rng = random.Random(len(text))
    for _ in range(num_random):
        yield sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randrange(2, max_pieces))))
    if is_char_by_char:
        yield list(range(1, len(text)))
