"""Start-up sweep of the dense step time T(B) over batch sizes, for the scheduler's GPU model.

Times the whole dense part of one decode step (embedding, every layer's QKV,
O-projection and MLP, the LM head) for B tokens at once, without attention,
which the KV nodes do; and one prompt's prefill (``time_prefill``, for the
hybrid choice). Runs on the Executor's device; synchronises around each timed
call so the figure is the device's busy time.
"""
from __future__ import annotations

import time

import torch

from fastdecode.actors.prefill import prefill
from fastdecode.scheduler import GpuPerfModel


def _dense_step(model, tokens: torch.Tensor, positions: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    x = model.embed(tokens)
    for layer in range(model.num_layers):
        model.pre_attention(layer, x, positions)
        x = model.post_attention(layer, x, o)
    return model.logits(x)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, *, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls of ``fn()``, after one untimed call (warm-up, compilation)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure_dense_profile(model, batches: tuple[int, ...], *, repeats: int = 3) -> GpuPerfModel:
    """Best-of-``repeats`` dense step seconds at each batch size, as a GpuPerfModel."""
    cfg = model.config
    device = model.device
    samples = []
    for batch in batches:
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        positions = torch.full((batch,), 16, dtype=torch.long, device=device)
        o = torch.zeros(batch, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=device)
        samples.append((batch, best_seconds(lambda: _dense_step(model, tokens, positions, o), device,
                                            repeats=repeats)))
    return GpuPerfModel(samples)


@torch.inference_mode()
def time_prefill(model, prompt_len: int) -> float:
    """Seconds of one prefill forward pass over ``prompt_len`` tokens."""
    tokens = torch.zeros(prompt_len, dtype=torch.long, device=model.device)
    return best_seconds(lambda: prefill(model, tokens), model.device, repeats=1)
