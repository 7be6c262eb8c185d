"""CUDA paths: random weights generated on the GPU in the target dtype, bf16 close to float32.

Skipped without a CUDA GPU.  The 70B case needs a GPU that holds 70B bf16 weights (an H200).
"""
from __future__ import annotations

import pytest
import torch

from fastdecode.actors.model import TorchKVCache, load_model, resolve_config
from fastdecode.actors.reference import run_tokens

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# rope tables, the float32 generation chunk, allocator slack
_OVERHEAD_BYTES = 1 << 30


def _prefill_logits(model, token_ids):
    cache = TorchKVCache.for_model(model)
    cache.allocate(0)
    return model.logits(run_tokens(model, cache, 0, token_ids, 0))


@torch.no_grad()
def test_bfloat16_on_cuda_is_close_to_float32_on_cpu():
    cpu, _ = load_model("random:tiny", dtype="float32", device="cpu", seed=1)
    gpu, _ = load_model("random:tiny", dtype="bfloat16", device="cuda", seed=1)
    gpu.load_state_dict({k: v.to(torch.bfloat16) for k, v in cpu.state_dict().items()})
    assert not torch.backends.cuda.matmul.allow_tf32
    prompt = list(range(300, 318)) + list(range(20, 60))
    expected = _prefill_logits(cpu, prompt)
    got = _prefill_logits(gpu, prompt).cpu()
    assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() > 0.9


def _check_big_preset(preset: str) -> None:
    config = resolve_config(f"random:{preset}")
    total = torch.cuda.get_device_properties(0).total_memory
    if total < config.weight_bytes(2) + _OVERHEAD_BYTES:
        pytest.skip(f"{preset} in bf16 needs {config.weight_bytes(2) / 2**30:.0f} GiB")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # what earlier tests of this process still hold
    model, tokenizer = load_model(f"random:{preset}", dtype="auto", device="cuda", seed=0)
    assert model.dtype == torch.bfloat16
    peak = torch.cuda.max_memory_allocated() - before
    print(f"{preset}: weights {config.weight_bytes(2) / 2**30:.1f} GiB, peak while loading {peak / 2**30:.1f} GiB")
    assert peak <= config.weight_bytes(2) + _OVERHEAD_BYTES
    with torch.no_grad():
        logits = _prefill_logits(model, tokenizer.encode("The capital of France is"))
    assert torch.isfinite(logits).all() and logits.std().item() > 0.1
    del model
    torch.cuda.empty_cache()


@pytest.mark.slow
def test_llama3_8b_random_weights_fit_without_a_float32_copy():
    _check_big_preset("llama3-8b")


@pytest.mark.slow
def test_llama3_70b_random_weights_fit_an_h200():
    _check_big_preset("llama3-70b")


@pytest.mark.slow
def test_qwen3_8b_random_weights_fit_without_a_float32_copy():
    _check_big_preset("qwen3-8b")
