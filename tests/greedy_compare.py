"""The issue's definition of "identical greedy tokens", shared by every equality test.

Tokens must match up to the first position where the reference's top-2 logit
gap is below ``NEAR_TIE`` (float rounding may then pick either token); the
comparison reports how many positions it compared and fails below ``MIN_COMPARED``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

NEAR_TIE = 1e-4
MIN_COMPARED = 8


def top2_gap(logits: torch.Tensor) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


def assert_same_greedy(
    ours: Sequence[int], reference: Sequence[int], reference_gaps: Sequence[float], *, label: str = "",
    min_compared: int = MIN_COMPARED,
) -> int:
    """Compare greedy tokens; returns (and prints) how many positions were compared."""
    if len(reference_gaps) != len(reference):
        raise ValueError("one gap per reference token")
    compared = 0
    for position, (mine, theirs, gap) in enumerate(zip(ours, reference, reference_gaps)):
        if gap < NEAR_TIE:
            break
        assert mine == theirs, (
            f"{label}: greedy tokens differ at position {position}: ours {mine}, reference {theirs} "
            f"(reference top-2 gap {gap:.3g}); ours {list(ours)}, reference {list(reference)}"
        )
        compared += 1
    print(f"{label}: compared {compared} greedy positions of {len(reference)}")
    assert compared >= min_compared, (
        f"{label}: only {compared} positions compared before a near-tie; need {min_compared}"
    )
    return compared


@torch.no_grad()
def transformers_greedy(model: torch.nn.Module, prompt_token_ids: Sequence[int],
                        num_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of a transformers causal LM (EOS ignored) and the top-2 gap at each step."""
    out = model(torch.tensor([list(prompt_token_ids)]), use_cache=True)
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(num_tokens):
        logits = out.logits[0, -1]
        gaps.append(top2_gap(logits))
        tokens.append(int(logits.argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, gaps
