"""The Executor's view of KV memory on each node, in pages, so it never overfills one.

A node holds pages of ``page_size`` tokens per (sequence, layer); a sequence of n
tokens takes ``num_layers * ceil(n / page_size)`` pages. The Executor asks before
it acts (``place``, ``overflowing_node``) and records what it did (``grow``,
``release``): the node itself stays the authority, this is the bookkeeping that
lets admission and preemption be decided without a round trip.
"""
from __future__ import annotations

import math


class KVBudget:
    def __init__(self, *, total_pages: list[int], page_sizes: list[int], num_layers: int) -> None:
        if len(total_pages) != len(page_sizes) or not total_pages:
            raise ValueError("one total and one page size per node")
        self.total_pages = list(total_pages)
        self.page_sizes = list(page_sizes)
        self.num_layers = num_layers
        self.used_pages = [0] * len(total_pages)
        self._pages: dict[int, tuple[int, int]] = {}  # seq_id -> (node, pages held)

    def pages_for(self, node: int, num_tokens: int) -> int:
        return self.num_layers * math.ceil(num_tokens / self.page_sizes[node])

    def free_pages(self, node: int) -> int:
        return self.total_pages[node] - self.used_pages[node]

    def can_hold(self, node: int, num_tokens: int) -> bool:
        return self.pages_for(node, num_tokens) <= self.free_pages(node)

    def hold(self, node: int, seq_id: int, num_tokens: int) -> None:
        """Record that ``seq_id`` now holds ``num_tokens`` tokens on ``node``."""
        pages = self.pages_for(node, num_tokens)
        _, old = self._pages.get(seq_id, (node, 0))
        self.used_pages[node] += pages - old
        self._pages[seq_id] = (node, pages)

    def release(self, seq_id: int) -> None:
        node, pages = self._pages.pop(seq_id)
        self.used_pages[node] -= pages

    def overflowing_node(self, num_tokens_by_seq: dict[int, int]) -> int | None:
        """A node whose sequences would need more pages than it has, once each
        sequence holds the given number of tokens; None when all fit."""
        need = list(self.used_pages)
        for seq_id, num_tokens in num_tokens_by_seq.items():
            node, pages = self._pages[seq_id]
            need[node] += self.pages_for(node, num_tokens) - pages
        for node, pages in enumerate(need):
            if pages > self.total_pages[node]:
                return node
        return None
