"""Automatic prefix caching, as vLLM's: the K/V of prompts' leading blocks kept for the next prompts that begin alike.

A prompt's tokens are cut into blocks of ``block_tokens``. A block is known by its own tokens and the id of the block
before it (ids are never reused), so a block matches only where the whole prompt up to its end matches: the keys are
exact, with no hash to collide, and each costs its own block's tokens to hash and compare. After a prefill,
``insert`` keeps the prompt's leading whole blocks not yet held (their keys and values
``[num_layers, block_tokens, Hkv, D]``, copied where the prefill ran: the Executor's device). Before the next
prefill, ``lookup`` returns the longest run of held blocks from the prompt's start, leaving at least the prompt's
last token to compute (its logits give the first output token). The prefill then starts after them
(``PrefillJob``): their K/V are copied into the prompt's buffers, where its attention reads them, and only the rest
of the prompt runs through the model.

Blocks are evicted least recently used once their bytes pass the budget. A lookup or insert marks a prompt's
blocks used from the last to the first, so a chain loses its tail first and a held block keeps the blocks before
it; a prompt keeps at most as many leading blocks as the budget holds. Lookups run on the Executor's loop and
inserts on the dense thread: a lock guards the table. A looked-up block's tensors are never written, so an eviction
after the lookup only drops the table's reference.

The K/V of a position depend only on the tokens up to it (causal attention, positions from 0), so a reused block
gives what computing it again would, up to float rounding of the attention split at the block's end (as chunked
prefill's chunks). A request that asks for prompt logprobs computes its whole prompt, as vLLM's.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fastdecode.executor")

DEFAULT_BLOCK_TOKENS = 32
# On CUDA a prompt starts after its cached blocks only where they hold this many tokens: a prefill pass costs about
# the same from 32 tokens to 544 there (random:llama3-8b in bf16 on the H100 host: 27-33 ms for 32 tokens after 512
# cached, 23-28 ms for all 544), and a prompt begun after its cache runs a pass of its own, where whole prompts share
# passes. 2,048 cached tokens halved the time to first token (docs/benchmarks.md, "Session 22").
CUDA_MIN_HIT_TOKENS = 1024
DEFAULT_CACHE_BYTES = 2 << 30  # of the Executor's device (GPU memory on CUDA)


@dataclass(frozen=True, eq=False)
class CachedBlock:
    block_id: int  # the key of the blocks after it
    keys: torch.Tensor  # [num_layers, block_tokens, Hkv, D], on the Executor's device
    values: torch.Tensor

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up and found, as vLLM's prefix_cache_queries and prefix_cache_hits counters."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    num_blocks: int = 0
    num_bytes: int = 0


class PrefixCache:
    """Whole prompt blocks' K/V by their token chain, least recently used evicted past ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 min_hit_tokens: int = 0) -> None:
        if max_bytes < 0 or block_tokens < 1:
            raise ValueError(f"a prefix cache needs max_bytes >= 0 and block_tokens >= 1, got {max_bytes}, "
                             f"{block_tokens}")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.min_hit_tokens = min_hit_tokens  # fewer cached tokens than this are not worth a pass of their own
        self.stats = PrefixCacheStats()
        # (key of the block before, or None; this block's tokens) -> block, least recently used first
        self._blocks: OrderedDict[tuple, CachedBlock] = OrderedDict()
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def _key(self, parent: CachedBlock | None, token_ids: list[int], index: int) -> tuple:
        """Block ``index`` of ``token_ids`` behind ``parent`` (None: the first block)."""
        start = index * self.block_tokens
        return None if parent is None else parent.block_id, tuple(token_ids[start:start + self.block_tokens])

    def lookup(self, token_ids: list[int]) -> list[CachedBlock]:
        """The held blocks that begin ``token_ids``, in order, at most up to its last token but one; none where they
        hold fewer than ``min_hit_tokens``."""
        num_blocks = (len(token_ids) - 1) // self.block_tokens
        found: list[CachedBlock] = []
        keys: list[tuple] = []
        with self._lock:
            self.stats.queried_tokens += len(token_ids)
            for index in range(num_blocks):
                key = self._key(found[-1] if found else None, token_ids, index)
                block = self._blocks.get(key)
                if block is None:
                    break
                found.append(block)
                keys.append(key)
            self._touch(keys)
            if len(found) * self.block_tokens < self.min_hit_tokens:
                found = []
            self.stats.hit_tokens += len(found) * self.block_tokens
        return found

    def insert(self, token_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the leading whole blocks of a prompt whose K/V ``[num_layers, >= len(token_ids), Hkv, D]`` were
        computed, as many as the budget holds: those not held yet are copied, on the K/V's device. Out of memory
        there, the rest of this prompt's are not kept (a prefill that runs out empties the cache: PrefillPasses)."""
        parent: CachedBlock | None = None
        touched: list[tuple] = []
        num_layers, _, num_heads, head_dim = keys.shape
        block_bytes = 2 * num_layers * self.block_tokens * num_heads * head_dim * keys.element_size()
        try:
            for index in range(min(len(token_ids), keys.shape[1]) // self.block_tokens):
                if (index + 1) * block_bytes > self.max_bytes:  # the prompt's leading blocks fill the budget
                    return
                key = self._key(parent, token_ids, index)
                with self._lock:
                    parent = self._blocks.get(key)
                if parent is None:
                    span = slice(index * self.block_tokens, (index + 1) * self.block_tokens)
                    try:
                        parent = CachedBlock(next(self._ids), keys[:, span].clone(), values[:, span].clone())
                    except RuntimeError as exc:  # torch.OutOfMemoryError on CUDA, a RuntimeError on the CPU
                        if "out of memory" not in str(exc) and "can't allocate memory" not in str(exc):
                            raise
                        log.warning("no memory for the prefix cache's blocks of a %d-token prompt: %s",
                                    len(token_ids), exc)
                        return
                with self._lock:
                    if key not in self._blocks:  # (another prompt's insert may have kept it meanwhile)
                        self._blocks[key] = parent
                        self.stats.num_blocks += 1
                        self.stats.num_bytes += parent.num_bytes
                    touched.append(key)
                    self._evict()
        finally:
            with self._lock:
                self._touch(touched)

    def _touch(self, keys: list[tuple]) -> None:
        """Mark a prompt's blocks used, the last first: a chain loses its tail before its head (a block whose head
        went could never be found again, yet would hold its bytes until evicted)."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.stats.num_bytes > self.max_bytes:
            _, block = self._blocks.popitem(last=False)
            self.stats.num_blocks -= 1
            self.stats.num_bytes -= block.num_bytes

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.stats.num_blocks = self.stats.num_bytes = 0


def fill_prefix(blocks: list[CachedBlock], keys: torch.Tensor, values: torch.Tensor) -> int:
    """Copy ``blocks`` to the start of a prompt's K/V buffers ``[num_layers, N, Hkv, D]``; the tokens they hold."""
    start = 0
    for block in blocks:
        end = start + block.keys.shape[1]
        keys[:, start:end].copy_(block.keys)
        values[:, start:end].copy_(block.values)
        start = end
    return start
