"""Placement: which node a new sequence lives on.

A new sequence goes to the node whose predicted attend time after adding it is
lowest, among the nodes with room for it (first those it does not overcommit).  The load of a node is the sum of its
resident sequences' reserved final lengths (prompt + max_tokens, the output part capped at
``reserved_output_limit`` tokens beyond what each has), so a node filled with
sequences that will grow long counts as busy before they have grown.

Room means, in pages of each node (``ceil(tokens / page_size)`` per layer):
- now: the pages in use plus the new prompt's (and its first generated token's)
  pages fit in the node's memory;
- later: the pages every resident will hold at its reserved final length, plus
  the new one's, fit in ``overcommit`` times the node's memory.  With
  ``overcommit == 1`` a node never runs out while its sequences stay within their
  reservations (always, when no max_tokens exceeds the reservation limit,
  ``min(max_reserved_output, an eighth of the node's tokens)``); above 1,
  or when a sequence outgrows its reservation, a node that does fill up preempts its
  youngest sequence (see ``preemption``).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fastdecode.scheduler.node import NodeModel


@dataclass(frozen=True)
class NodeLoad:
    """A node and what its resident sequences hold now and will hold at the end."""

    node: NodeModel
    num_used_pages: int = 0  # pages the residents hold now
    num_committed_pages: int = 0  # pages the residents will hold at their expected final lengths
    num_final_tokens: int = 0  # sum of the residents' expected final lengths

    def has_room(self, prompt_len: int, expected_final_len: int, overcommit: float = 1.0) -> bool:
        node = self.node
        if self.num_used_pages + node.pages_for(prompt_len + 1) > node.num_pages:
            return False
        return self.num_committed_pages + node.pages_for(expected_final_len) <= node.num_pages * overcommit

    def predicted_attend_s(self, extra_tokens: int = 0) -> float:
        """Predicted attend time over all residents at their final lengths, plus ``extra_tokens``."""
        return self.node.predict_attend_s(self.num_final_tokens + extra_tokens)


NUM_SHARERS = 8  # a sequence reserves at most 1/NUM_SHARERS of a node's tokens for its output (reserved_output_limit)


def reserved_output_limit(node: NodeModel, max_reserved_output: int | None) -> int | None:
    """The most output tokens ahead of its length a sequence on ``node`` reserves (None: all of max_tokens):
    ``max_reserved_output``, and at most an eighth of the node's tokens, so that a node whose memory holds only a
    few contexts (max_model_len is cut to the largest node) still starts several long-limit requests together."""
    if max_reserved_output is None:
        return None
    return max(1, min(max_reserved_output, node.num_pages * node.page_size // NUM_SHARERS))


def check_lengths(prompt_len: int, expected_final_len: int) -> None:
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, numbers.Integral) or prompt_len < 1:
        raise ValueError(f"prompt_len must be a positive integer, got {prompt_len!r}")
    if isinstance(expected_final_len, bool) or not isinstance(expected_final_len, numbers.Integral):
        raise ValueError(f"expected_final_len must be an integer, got {expected_final_len!r}")
    if expected_final_len <= prompt_len:
        raise ValueError(f"expected_final_len ({expected_final_len}) must exceed prompt_len ({prompt_len})")


def choose_node(
    loads: Iterable[NodeLoad], prompt_len: int, expected_final_len: int | Mapping[int, int], *,
    overcommit: float = 1.0
) -> int | None:
    """The node id with the lowest predicted attend time after adding the sequence, or None if none has room.
    ``expected_final_len``: one length, or by node id (a reservation may depend on the node).

    Nodes with room for it without overcommitting come first: only when none has does the sequence go to a
    node it overcommits (otherwise the fastest node filled up to ``overcommit`` times its memory, and preempted,
    while a bigger one stood nearly empty). Ties go to the lower node id, so the choice is deterministic.
    """
    loads = list(loads)
    lengths = {load.node.node_id: expected_final_len[load.node.node_id] if isinstance(expected_final_len, Mapping)
               else expected_final_len for load in loads}
    for length in lengths.values():
        check_lengths(prompt_len, length)
    for limit in dict.fromkeys((1.0, max(overcommit, 1.0))):  # 1, then the overcommit (once when it is 1)
        best: tuple[float, int] | None = None
        for load in loads:
            length = lengths[load.node.node_id]
            if not load.has_room(prompt_len, length, limit):
                continue
            key = (load.predicted_attend_s(length), load.node.node_id)
            if best is None or key < best:
                best = key
        if best is not None:
            return best[1]
    return None


def can_ever_fit(nodes: Iterable[NodeModel], expected_final_len: int) -> bool:
    """Whether some node, empty, could hold a sequence of ``expected_final_len`` tokens."""
    return any(node.pages_for(expected_final_len) <= node.num_pages for node in nodes)
