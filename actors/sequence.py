"""One request's generation state inside the Executor, and its token stream out."""
from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdecode.actors.request import SamplingParams, TokenEvent
from fastdecode.actors.sampling import SamplingRow


class EventChannel:
    """One request's token events, from the Executor to one reader: a FIFO whose reader waits on
    one future only while it is empty (an ``asyncio.Queue`` costs several times more per token, and
    the Executor puts one event per running request every step)."""

    def __init__(self) -> None:
        self._events: deque[TokenEvent] = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, event: TokenEvent) -> None:
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> TokenEvent:
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    def qsize(self) -> int:
        return len(self._events)


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV
    RUNNING = "running"  # KV on a node, decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request being generated. ``seq_id`` doubles as the request id."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    events: EventChannel  # read by the request's stream
    generator: torch.Generator | None = None  # set for seeded sampling
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    node_index: int | None = None  # which KV node holds it while RUNNING
    node_epoch: int = 0  # that node's connection epoch when the sequence was placed on it
    arrival_s: float = field(default_factory=time.monotonic)
    is_abort_requested: bool = False
    num_preemptions: int = 0
    is_recovering: bool = False  # its node failed or drained: the next prefill rebuilds it elsewhere
    matcher: Any = None  # its GrammarMatcher where it has structured outputs: advanced by each token
    sampling_row: SamplingRow = field(init=False, repr=False)  # the sampler's view, made once (live lists)

    def __post_init__(self) -> None:
        self.sampling_row = SamplingRow(self.params, self.prompt_ids, self.output_ids, self.generator, self.matcher)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def emit(self, event: TokenEvent) -> None:
        self.events.put_nowait(event)

    def end_event(self, finish_reason: str, error: str | None = None, *, is_retryable: bool = False) -> TokenEvent:
        """The event that ends the request with no token (abort, a stop string, an error)."""
        return TokenEvent(self.seq_id, -1, len(self.output_ids), finish_reason=finish_reason, error=error,
                          is_retryable=is_retryable)


class HeldEvents:
    """A step's token events (not a request's last), held and handed to the streams as the next decode step starts:
    after its launch where that is a CUDA replay, so the readers' wake-ups overlap the GPU instead of delaying it;
    before a step that runs to its end (layer by layer over the shards, or on the CPU), which would hold them for all
    of it. A sequence that ends gets its own held events first, so its stream sees them in order."""

    def __init__(self) -> None:
        self._held: list[tuple[Sequence, TokenEvent]] = []

    def hold(self, seq: Sequence, event: TokenEvent) -> None:
        self._held.append((seq, event))

    def emit(self, seq_ids: set[int] | None = None) -> None:
        """Hand the held events to their streams: all, or those of ``seq_ids`` alone (the others stay held)."""
        if seq_ids is None:
            emitted, self._held = self._held, []
        else:
            emitted = [(seq, event) for seq, event in self._held if seq.seq_id in seq_ids]
            self._held = [(seq, event) for seq, event in self._held if seq.seq_id not in seq_ids]
        for seq, event in emitted:
            seq.emit(event)


def finish_reason_after(
    seq: Sequence, token_id: int, *, eos_token_ids: frozenset[int], max_model_len: int
) -> str | None:
    """Why ``seq`` stops after ``token_id`` was appended to its output, or None.

    EOS counts only once ``min_tokens`` are out and unless ``ignore_eos``;
    explicit stop token ids always stop. Stop *strings* are the detokenizer's
    business, since they need text.
    """
    params = seq.params
    num_out = len(seq.output_ids)
    if seq.matcher is not None and seq.matcher.is_terminated():  # its grammar took a stop token: complete
        return "stop"
    if token_id in params.stop_token_ids and num_out >= params.min_tokens:
        return "stop"
    if not params.ignore_eos and token_id in eos_token_ids and num_out >= params.min_tokens:
        return "stop"
    if num_out >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None
