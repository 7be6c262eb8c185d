"""The names an AsyncLLM's callers gave their requests (``NamedRequests``): one name holds the engine ids of all its
request's samples, and ``abort`` returns every one of them."""
from __future__ import annotations

import pytest

from fastdecode.actors.named_requests import NamedRequests


def test_abort_returns_the_engine_ids_of_every_sample_of_each_name():
    names = NamedRequests()
    with names.hold("three") as three, names.hold("one") as one, names.hold("tokenizing") as tokenizing:
        three.seq_ids += [4, 5, 6]  # an n = 3 request: one engine request per sample
        one.seq_ids.append(7)
        assert names.abort(["three", "tokenizing", "finished"]) == [4, 5, 6]  # none submitted yet: none to end
        assert three.is_aborted and tokenizing.is_aborted and not one.is_aborted
        assert names.abort("one") == [7] and one.is_aborted
    assert len(names) == 0 and names.abort(["three", "one"]) == []  # forgotten once over


def test_a_name_starts_with_no_engine_ids_and_is_free_again_once_over():
    names = NamedRequests()
    with names.hold("a") as named:
        assert (named.request_id, named.seq_ids, named.is_aborted) == ("a", [], False)
        with pytest.raises(ValueError, match="'a' is already in use"):
            names.check_free("a")
    with names.hold("a") as again:
        assert again is not named and again.seq_ids == []  # a fresh request: not the finished one's ids
