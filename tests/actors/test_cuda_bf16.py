"""bf16 on CUDA against the float32 reference, teacher-forced (the real default model)."""
from __future__ import annotations

import pytest
import torch

from fastdecode.actors.model import load_model, prefill_attention
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.loader import SMOLLM2_PACKAGE, smollm2_gguf_path
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams


def _has_default_model() -> bool:
    try:
        smollm2_gguf_path()
    except ModelError:
        return False
    return True


# The lent GPU hosts have no network and the package's GGUF (98 MB) is over what a device call carries.
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not _has_default_model(),
                                 reason=f"needs the default model's package ({SMOLLM2_PACKAGE}) installed")]

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Three reasons to learn a second language are",
]


@torch.no_grad()
def all_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of one sequence (causal), float32 on the CPU."""
    tokens = torch.tensor(token_ids, device=model.device)
    positions = torch.arange(len(token_ids), device=model.device)
    x = model.embed(tokens)
    for layer in range(model.num_layers):
        q, k, v = model.pre_attention(layer, x, positions)
        x = model.post_attention(layer, x, prefill_attention(q, k, v))
    return model.logits(x).float().cpu()


def test_bf16_teacher_forced_matches_float32_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    reference_model, tokenizer = load_model("smollm2", dtype="float32", device="cuda")
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    references = [reference_generate(reference_model, tokenizer, tokenizer.encode(p), params) for p in PROMPTS]
    del reference_model
    model, _ = load_model("smollm2", dtype="bfloat16", device="cuda")
    num_positions = num_top1 = num_in_top5 = 0
    for ref in references:
        logits = all_logits(model, ref.prompt_token_ids + ref.token_ids)
        start = len(ref.prompt_token_ids) - 1  # logits at position p predict token p + 1
        predicted = logits[start:start + len(ref.token_ids)]
        target = torch.tensor(ref.token_ids)
        num_positions += len(target)
        num_top1 += int((predicted.argmax(-1) == target).sum())
        num_in_top5 += int((predicted.topk(5, dim=-1).indices == target.unsqueeze(1)).any(-1).sum())
    top1 = num_top1 / num_positions
    print(f"bf16 vs float32 reference: top-1 agreement {top1:.4f} over {num_positions} positions, "
          f"{num_in_top5} of {num_positions} reference tokens in the top 5")
    assert num_positions == len(PROMPTS) * 64
    assert top1 >= 0.97
    assert num_in_top5 == num_positions
