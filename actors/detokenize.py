"""Incremental detokenization with stop strings (vLLM semantics).

``Detokenizer.add(token_id)`` returns the newly complete text: it never ends in
half a UTF-8 character (byte-level and byte-fallback tokens can split one), and
it holds back text that may be the start of a stop string.  When a stop string
appears, the text is cut just before it and ``hit_stop`` is True; the stop
string itself is not part of the output, and ``stop_string`` says which one it was.

``min_tokens`` follows vLLM's v1 detokenizer: the text of the first
``min_tokens`` tokens is never searched, so a stop string lying wholly inside it
does not stop the request (the text flows on).  From the next token on, the
search covers the new text plus a look-back of ``len(stop) - 1`` characters, so
a stop string that begins in that earlier text and ends in the new text does
match, and the output is cut where it begins.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# prompt tokens kept as decoding context (a word's leading space depends on its left neighbour)
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class Detokenizer:
    """Turns one request's generated tokens into text, piece by piece."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 *, min_tokens: int = 0, skip_special_tokens: bool = True) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {min_tokens}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(self._token_ids)  # tokens before this are already turned into text
        self._stop = tuple(stop)
        self._min_tokens = min_tokens
        self._num_tokens = 0  # generated tokens fed so far
        self._pending = ""  # decoded text held back as a possible stop-string start
        self._num_unsearched = 0  # leading characters of _pending from the first min_tokens tokens
        self._text: list[str] = []
        self.is_stopped = False
        self.stop_string: str | None = None  # the stop string that matched (the first listed, at a tie)

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._text)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token; return ``(new_text, hit_stop)``."""
        if self.is_stopped:
            return "", True
        self._num_tokens += 1
        self._token_ids.append(token_id)
        before = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._token_ids[self._prefix_offset:])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return "", False  # an incomplete character (or nothing visible yet)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return self._release(after[len(before):])

    def finish(self) -> str:
        """End of generation: release what was held back (a partial character shows as U+FFFD)."""
        if self.is_stopped:
            return ""
        before = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._token_ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        piece = self._pending + after[len(before):]
        self._pending = ""
        self._text.append(piece)
        return piece

    def _release(self, new_text: str) -> tuple[str, bool]:
        pending = self._pending + new_text
        if self._num_tokens <= self._min_tokens:
            num_unsearched = len(pending)  # not searched, though a stop string may begin in it
        else:
            num_unsearched = self._num_unsearched
            # a match must end past the unsearched text (in text already searched it would have stopped us)
            starts = ((pending.find(s, max(0, num_unsearched - len(s) + 1)), s) for s in self._stop)
            found = [(index, s) for index, s in starts if index >= 0]
            if found:
                cut = min(index for index, _ in found)
                self.stop_string = next(s for index, s in found if index == cut)
                piece, self._pending, self.is_stopped = pending[:cut], "", True
                self._text.append(piece)
                return piece, True
        cut = len(pending) - self._held_length(pending)
        piece, self._pending = pending[:cut], pending[cut:]
        self._num_unsearched = max(0, num_unsearched - cut)
        self._text.append(piece)
        return piece, False

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
