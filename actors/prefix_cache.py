"""Automatic prefix caching, as vLLM's: the K/V of prompts' leading blocks kept for the next prompts that begin alike.

A prompt's tokens are cut into blocks of ``block_tokens``. A block is known by its own tokens and the id of the block
before it (ids are never reused), so a block matches only where the whole prompt up to its end matches: the keys are
exact, with no hash to collide, and each costs its own block's tokens to hash and compare. After a prefill, ``insert`` keeps each whole block not yet held (its keys and values
``[num_layers, block_tokens, Hkv, D]``, copied where the prefill ran: the Executor's device). Before the next
prefill, ``lookup`` returns the
longest run of held blocks from the prompt's start, leaving at least the prompt's last token to compute (its
logits give the first output token). The prefill then starts after them (``PrefillJob``): the prompt's
attention reads the cached K/V in place, and only the rest of the prompt runs through the model.

Blocks are evicted least recently used once their bytes pass the budget. A lookup touches a prompt's blocks from
the first on, so a block is never more recent than the blocks after it: later blocks go first, and no held block
loses the block before it for long. Lookups run on the Executor's loop and inserts on the dense thread: a lock
guards the table. A looked-up block's tensors are never written, so an eviction after the lookup only drops the
table's reference.

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
        with self._lock:
            self.stats.queried_tokens += len(token_ids)
            for index in range(num_blocks):
                key = self._key(found[-1] if found else None, token_ids, index)
                block = self._blocks.get(key)
                if block is None:
                    break
                self._blocks.move_to_end(key)
                found.append(block)
            if len(found) * self.block_tokens < self.min_hit_tokens:
                found = []
            self.stats.hit_tokens += len(found) * self.block_tokens
        return found

    def insert(self, token_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the whole blocks of a prompt whose K/V ``[num_layers, >= len(token_ids), Hkv, D]`` were computed:
        those not held yet are copied, on the K/V's device. Out of device memory, the rest are not kept, and the
        budget becomes what the cache holds."""
        if not self.max_bytes:
            return
        parent: CachedBlock | None = None
        for index in range(len(token_ids) // self.block_tokens):
            key = self._key(parent, token_ids, index)
            with self._lock:
                held = self._blocks.get(key)
                if held is not None:
                    self._blocks.move_to_end(key)
                    parent = held
                    continue
            span = slice(index * self.block_tokens, (index + 1) * self.block_tokens)
            try:
                copies = keys[:, span].clone(), values[:, span].clone()
            except RuntimeError as exc:  # torch.OutOfMemoryError
                if "out of memory" not in str(exc):
                    raise
                with self._lock:
                    self.max_bytes = self.stats.num_bytes
                log.warning("the prefix cache ran out of device memory at %.2f GiB: that is its budget now",
                            self.max_bytes / (1 << 30))
                return
            with self._lock:
                parent = self._blocks.get(key)  # kept meanwhile by another prompt's insert
                if parent is None:
                    parent = CachedBlock(next(self._ids), *copies)
                    if parent.num_bytes > self.max_bytes:
                        return
                    self._blocks[key] = parent
                    self.stats.num_blocks += 1
                    self.stats.num_bytes += parent.num_bytes
                    self._evict()

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
