"""Stand-ins the scheduler tests share: KV node models of a given size, and sequences as admission sees them."""
from __future__ import annotations

from dataclasses import dataclass

from fastdecode.scheduler import NodeModel, ShardPerfModel

KV = 1024  # bytes per token, all layers
PAGE = 16


def node(node_id: int, capacity_tokens: int = 1_000_000, speed: float = 1.0) -> NodeModel:
    """A node holding ``capacity_tokens`` tokens in pages of PAGE, attending at ``speed`` GB/s."""
    return NodeModel(node_id, capacity_tokens * KV, KV, 2, PAGE, ShardPerfModel(10e-6, speed * 1e9))


@dataclass
class Seq:
    prompt_len: int
    max_tokens: int
    num_generated: int = 0
    stop_at: int | None = None  # finishes early after this many tokens

    @property
    def context_len(self):
        return self.prompt_len + self.num_generated

    @property
    def is_done(self):
        return self.num_generated >= (self.stop_at or self.max_tokens)
