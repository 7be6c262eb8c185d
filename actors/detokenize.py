"""Incremental detokenization with stop strings (vLLM semantics).

``Detokenizer.add(token_id)`` returns the newly complete text: it never ends in
half a UTF-8 character (byte-level and byte-fallback tokens can split one), and
it holds back text that may be the start of a stop string.  When a stop string
appears, the text is cut just before it and ``hit_stop`` is True; the stop
string itself is not part of the output, and ``stop_string`` says which one it was.
With ``include_stop_str_in_output`` (vLLM's) nothing is held back and the text is
cut just after the stop string instead.

``min_tokens`` follows vLLM's v1 detokenizer: the text of the first
``min_tokens`` tokens is never searched, so a stop string lying wholly inside it
does not stop the request (the text flows on).  From the next token on, the
search covers the new text plus a look-back of ``len(stop) - 1`` characters, so
a stop string that begins in that earlier text and ends in the new text does
match, and the output is cut where it begins.

``skip_special_tokens`` and ``spaces_between_special_tokens`` are vLLM's too; the
latter False acts as vLLM's fast detokenizer does: an added token right after
another added token shows as its own text, without the space a decoder may put
before it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fastdecode.actors.request import SamplingParams

# prompt tokens kept as decoding context (a word's leading space depends on its left neighbour)
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class Detokenizer:
    """Turns one request's generated tokens into text, piece by piece."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 *, min_tokens: int = 0, skip_special_tokens: bool = True, include_stop_str_in_output: bool = False,
                 spaces_between_special_tokens: bool = True) -> None:
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
        self._is_stop_kept = include_stop_str_in_output
        self._look_back = max((len(s) for s in self._stop), default=1) - 1  # characters a stop string may begin back
        self._min_tokens = min_tokens
        self._num_tokens = 0  # generated tokens fed so far
        self._pending = ""  # decoded text held back as a possible stop-string start
        self._tail = ""  # with include_stop_str_in_output: the last _look_back characters returned
        # added tokens' texts where consecutive ones are joined with no space (vLLM's fast path), else None
        self._added_texts = None if skip_special_tokens or spaces_between_special_tokens else (
            _added_token_texts(tokenizer) or None)
        self._is_last_added = False
        self._text: list[str] = []
        self.is_stopped = False
        self.stop_string: str | None = None  # the stop string that matched (the first listed, at a tie)

    @classmethod
    def for_params(cls, tokenizer: _Decoder, prompt_token_ids: Sequence[int],
                   params: "SamplingParams") -> "Detokenizer":
        """The detokenizer of a request of ``params`` (its stop strings, min_tokens and text fields)."""
        return cls(tokenizer, prompt_token_ids, stop=params.stop, min_tokens=params.min_tokens,
                   skip_special_tokens=params.skip_special_tokens,
                   include_stop_str_in_output=params.include_stop_str_in_output,
                   spaces_between_special_tokens=params.spaces_between_special_tokens)

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
        added_text = None if self._added_texts is None else self._added_texts.get(token_id)
        is_joined = added_text is not None and self._is_last_added
        self._is_last_added = added_text is not None
        before = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._token_ids[self._prefix_offset:])
        if not is_joined and (len(after) <= len(before) or after.endswith(_REPLACEMENT)):
            return "", False  # an incomplete character (or nothing visible yet)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return self._release(added_text if is_joined else after[len(before):])

    def finish(self, stop_token_id: int | None = None) -> str:
        """End of generation: release what was held back (a partial character shows as U+FFFD).
        ``stop_token_id``: the stop token id or EOS the engine stopped on, whose text comes first with
        include_stop_str_in_output (vLLM's; without it the token's text is left out), and may complete a stop string
        (then ``stop_string`` says which)."""
        if self.is_stopped:
            return ""
        last = ""
        if stop_token_id is not None and self._is_stop_kept:
            last, is_stopped = self.add(stop_token_id)
            if is_stopped:
                return last
        before = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._token_ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        piece = self._pending + after[len(before):]
        self._pending = ""
        self._text.append(piece)
        return last + piece

    def _release(self, new_text: str) -> tuple[str, bool]:
        pending = self._pending + new_text
        if self._num_tokens > self._min_tokens and self._stop:
            # a match must end in the new text: the text before it was searched, or is the first min_tokens tokens'
            text = self._tail + pending
            searched_end = len(text) - len(new_text)
            starts = ((text.find(s, max(0, searched_end - len(s) + 1)), s) for s in self._stop)
            found = [(index, s) for index, s in starts if index >= 0]
            if found:
                start = min(index for index, _ in found)
                self.stop_string = next(s for index, s in found if index == start)
                end = start + len(self.stop_string) if self._is_stop_kept else start
                piece, self._pending, self.is_stopped = pending[:end - len(self._tail)], "", True
                self._text.append(piece)
                return piece, True
        cut = len(pending) - self._held_length(pending)
        piece, self._pending = pending[:cut], pending[cut:]
        self._text.append(piece)
        if self._is_stop_kept and self._look_back:
            self._tail = (self._tail + piece)[-self._look_back:]
        return piece, False

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string (none is held back where the stop
        string is kept: vLLM streams that text at once)."""
        if self._is_stop_kept:
            return 0
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def _added_token_texts(tokenizer: object) -> Mapping[int, str]:
    """The added tokens' ids and texts of ``tokenizer`` (a ``Tokenizer``'s backend, vLLM's ``added_token_ids``);
    none where it has no backend to ask."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return {}
    return {token_id: token.content for token_id, token in backend.get_added_tokens_decoder().items()}
