"""Bookkeeping of every sequence the scheduler knows: waiting (FCFS) and running.

Token convention (shared with the Executor): ``num_generated`` counts the tokens
already sampled for the sequence.  While a decode step runs, the node holds the
KV of ``context_len = prompt_len + num_generated`` tokens (the step appends the
last sampled token's K/V).  A fresh sequence is prefilled with its prompt, which
samples its first token.  A preempted sequence keeps its ``num_generated``; it
is rebuilt by prefilling its prompt and its output but the last token
(``prefill_len``), without sampling; the next decode step feeds that last
token and samples the one after, so nothing is lost or sampled twice.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fastdecode.scheduler.placement import NodeLoad, reserved_output_limit
from fastdecode.scheduler.node import NodeModel


@dataclass
class SequenceRecord:
    """One request's scheduling state (the scheduler owns and mutates it)."""

    seq_id: int
    prompt_len: int
    max_tokens: int
    arrival_index: int  # order of arrival; a preempted sequence keeps it
    num_generated: int = 0
    node_id: int | None = None  # set while running
    minibatch: int | None = None  # 0 (A) or 1 (B) while running
    admit_step: int | None = None  # step of the latest admission
    num_preemptions: int = 0

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.num_generated

    @property
    def prefill_len(self) -> int:
        """Tokens to prefill on (re)admission: the prompt, plus the output but its last token."""
        return self.prompt_len + max(self.num_generated - 1, 0)

    @property
    def expected_final_len(self) -> int:
        return self.prompt_len + self.max_tokens

    def reserved_final_len(self, max_reserved_output: int | None) -> int:
        """The length it reserves KV for: its prompt plus ``max_tokens`` output tokens, or plus at most
        ``max_reserved_output`` tokens beyond those it has (None: no such limit)."""
        if max_reserved_output is None:
            return self.prompt_len + self.max_tokens
        return self.prompt_len + min(self.max_tokens, self.num_generated + max_reserved_output)

    @property
    def num_remaining(self) -> int:
        return self.max_tokens - self.num_generated

    @property
    def is_running(self) -> bool:
        return self.node_id is not None


class SequenceTable:
    """Waiting queue (FCFS by arrival, preempted sequences back in their arrival order) and running set.

    The queue is always in arrival order (new sequences arrive last, requeued ones go back by theirs), so it is
    kept as a dict of seq ids: a start or an abort anywhere in it takes O(1); a requeue appends, and the queue is
    put back in arrival order when it is next read."""

    def __init__(self) -> None:
        self._records: dict[int, SequenceRecord] = {}
        self._waiting: dict[int, None] = {}  # in arrival order unless _is_waiting_unsorted
        self._is_waiting_unsorted = False
        self._running: dict[int, SequenceRecord] = {}
        self._num_arrivals = 0

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._records

    def get(self, seq_id: int) -> SequenceRecord:
        try:
            return self._records[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id}") from None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def waiting(self) -> Iterator[SequenceRecord]:
        if self._is_waiting_unsorted:
            self._waiting = dict.fromkeys(sorted(self._waiting, key=lambda i: self._records[i].arrival_index))
            self._is_waiting_unsorted = False
        return (self._records[i] for i in self._waiting)

    def running(self) -> Iterator[SequenceRecord]:
        return iter(self._running.values())

    def add(self, seq_id: int, prompt_len: int, max_tokens: int) -> SequenceRecord:
        if seq_id in self._records:
            raise ValueError(f"sequence {seq_id} is already known")
        record = SequenceRecord(seq_id, int(prompt_len), int(max_tokens), arrival_index=self._num_arrivals)
        self._num_arrivals += 1
        self._records[seq_id] = record
        self._waiting[seq_id] = None
        return record

    def start(self, seq_id: int, node_id: int, step: int) -> SequenceRecord:
        """Move a waiting sequence to running on ``node_id`` (mini-batch still unassigned): the head of the
        queue, or one behind sequences that wait for a node able to hold them (the scheduler's choice)."""
        if seq_id not in self._waiting:
            raise ValueError(f"sequence {seq_id} is not waiting")
        del self._waiting[seq_id]
        record = self._records[seq_id]
        record.node_id, record.minibatch, record.admit_step = node_id, None, step
        self._running[seq_id] = record
        return record

    def requeue(self, seq_id: int) -> SequenceRecord:
        """Take a running sequence off its node and put it back in the queue by its arrival order."""
        record = self._running.pop(seq_id)
        record.node_id = record.minibatch = None
        record.num_preemptions += 1
        self._waiting[seq_id] = None
        self._is_waiting_unsorted = True
        return record

    def remove(self, seq_id: int) -> SequenceRecord:
        """Forget a sequence (finished or aborted), wherever it is."""
        record = self.get(seq_id)
        del self._records[seq_id]
        if self._running.pop(seq_id, None) is None:
            del self._waiting[seq_id]
        return record

    def node_loads(self, nodes: dict[int, NodeModel], max_reserved_output: int | None = None) -> dict[int, NodeLoad]:
        """Per node: pages held now, pages committed at the reserved final lengths
        (``SequenceRecord.reserved_final_len`` with the node's ``reserved_output_limit``), sum of those lengths."""
        used = dict.fromkeys(nodes, 0)
        committed = dict.fromkeys(nodes, 0)
        final = dict.fromkeys(nodes, 0)
        page_size = {i: node.page_size for i, node in nodes.items()}
        reserved = {i: reserved_output_limit(node, max_reserved_output) for i, node in nodes.items()}
        for record in self._running.values():  # ceil divisions inlined: this runs every step over every sequence
            node_id, size = record.node_id, page_size[record.node_id]
            final_len = record.prompt_len + record.max_tokens
            if reserved[node_id] is not None:
                final_len = min(final_len, record.prompt_len + record.num_generated + reserved[node_id])
            used[node_id] += -(-(record.prompt_len + record.num_generated) // size)
            committed[node_id] += -(-final_len // size)
            final[node_id] += final_len
        return {i: NodeLoad(nodes[i], used[i], committed[i], final[i]) for i in nodes}
