"""The requests an AsyncLLM's callers named (vLLM's ``request_id``): each live name once, aborted by name, forgotten
as its request ends."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass
class NamedRequest:
    """One live named request: the engine ids of its samples as each is submitted (none while its prompt is
    tokenized; n of them for ``SamplingParams.n`` samples), and whether ``abort`` asked for its end (one aborted
    before its submission is never submitted)."""

    request_id: str
    seq_ids: list[int] = field(default_factory=list)
    is_aborted: bool = False


class NamedRequests:
    """The live names and their requests: a name is held from its request's start until its stream ends, however
    it ends, so a finished request's name is forgotten."""

    def __init__(self) -> None:
        self._live: dict[str, NamedRequest] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._live

    def check_free(self, request_id: str | None) -> None:
        """TypeError for a name that is not a str; ValueError for one a live request holds (as vLLM refuses it)."""
        if request_id is None:
            return
        _check_id(request_id)
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in use by a live request: give each request "
                             "its own id (a finished or aborted request's id is free again)")

    @contextlib.contextmanager
    def hold(self, request_id: str | None) -> Iterator[NamedRequest | None]:
        """The name held for the block (``check_free``'s errors if it cannot be), let go when the block ends;
        None for a request not named."""
        if request_id is None:
            yield None
            return
        self.check_free(request_id)
        named = self._live[request_id] = NamedRequest(request_id)
        try:
            yield named
        finally:
            del self._live[request_id]

    def abort(self, request_ids: str | Iterable[str]) -> list[int]:
        """Mark the live requests of these names aborted (one not yet submitted never will be) and return the engine
        ids of their samples submitted, for ``Executor.abort``; a name no live request holds (unknown, finished) is
        passed over. TypeError, before any is marked, for a name that is not a str."""
        is_one = isinstance(request_ids, str) or not isinstance(request_ids, Iterable)
        ids = [request_ids] if is_one else list(request_ids)
        for request_id in ids:
            _check_id(request_id)
        seq_ids = []
        for named in filter(None, map(self._live.get, ids)):
            named.is_aborted = True
            seq_ids += named.seq_ids
        return seq_ids


def _check_id(request_id: object) -> None:
    if not isinstance(request_id, str):
        raise TypeError(f"a request_id must be a str, got {type(request_id).__name__}")
