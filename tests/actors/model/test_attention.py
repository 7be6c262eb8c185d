"""The plain-torch attention part and the flat ragged layout of the dense part."""
from __future__ import annotations

import math

import pytest
import torch

from fastdecode.actors.model import TorchKVCache, prefill_attention, prefill_attention_ragged
from fastdecode.actors.model.attention import RaggedPrompts
from fastdecode.actors.reference import run_tokens


def _naive_causal(q, k, v):
    """Per head, per position, written out: query head h uses KV head h // group."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty_like(q)
    for t in range(num_tokens):
        for h in range(num_heads):
            scores = torch.stack([q[t, h] @ k[s, h // group] for s in range(t + 1)]) / math.sqrt(head_dim)
            out[t, h] = torch.softmax(scores, 0) @ v[: t + 1, h // group]
    return out


def _qkv(num_tokens=7, num_heads=4, num_kv_heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, num_heads, head_dim, generator=g),
            torch.randn(num_tokens, num_kv_heads, head_dim, generator=g),
            torch.randn(num_tokens, num_kv_heads, head_dim, generator=g))


def test_prefill_attention_is_causal_gqa():
    q, k, v = _qkv()
    torch.testing.assert_close(prefill_attention(q, k, v), _naive_causal(q, k, v), atol=1e-5, rtol=1e-5)


def test_decode_over_cache_equals_causal_prefill():
    q, k, v = _qkv(num_tokens=9)
    cache = TorchKVCache(num_layers=1, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    cache.allocate(3)
    cache.append(3, 0, k[:4], v[:4])  # a prompt of 4
    rows = [cache.attend(0, [3], q[t:t + 1], k[t:t + 1], v[t:t + 1]) for t in range(4, 9)]
    assert cache.num_tokens(3) == 9
    torch.testing.assert_close(torch.cat(rows), prefill_attention(q, k, v)[4:], atol=1e-5, rtol=1e-5)


def test_attend_batches_rows_of_different_sequences():
    q, k, v = _qkv(num_tokens=6)
    cache = TorchKVCache(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    for seq_id, length in ((10, 2), (20, 3)):
        cache.allocate(seq_id)
        cache.append(seq_id, 1, k[:length], v[:length])
    out = cache.attend(1, [20, 10], q[4:6], k[4:6], v[4:6])
    alone = TorchKVCache(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    alone.allocate(20)
    alone.append(20, 1, k[:3], v[:3])
    torch.testing.assert_close(out[0:1], alone.attend(1, [20], q[4:5], k[4:5], v[4:5]))
    assert cache.num_tokens(10, layer=1) == 3 and cache.num_tokens(20, layer=1) == 4
    assert cache.num_tokens(10, layer=0) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: no varlen kernel on a CPU, the loop
@pytest.mark.parametrize("seq_lens", [[3, 4], [3, 3, 3], [1, 5, 1]])  # per prompt / one SDPA batch / per prompt
def test_ragged_prefill_keeps_prompts_apart(seq_lens, dtype):
    q, k, v = (t.to(dtype) for t in _qkv(num_tokens=sum(seq_lens)))
    out = prefill_attention_ragged(q, k, v, RaggedPrompts.of(seq_lens, q.device, q.dtype, q.shape[-1]))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    start = 0
    for length in seq_lens:
        part = slice(start, start + length)
        expected = _naive_causal(q[part].float(), k[part].float(), v[part].float())
        torch.testing.assert_close(out[part].float(), expected, atol=tolerance, rtol=tolerance)
        start += length
    with pytest.raises(ValueError, match="sum to"):
        prefill_attention_ragged(q, k, v, RaggedPrompts.of(seq_lens[1:], q.device, q.dtype, q.shape[-1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seq_lens", [[5, 130, 1, 64], [64, 64]])  # flash's varlen kernel / one SDPA batch
def test_ragged_prefill_on_gpu_matches_each_prompt_alone(seq_lens, monkeypatch):
    from fastdecode.actors.model import attention

    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(num_tokens=sum(seq_lens), num_heads=8, num_kv_heads=2,
                                                          head_dim=64))
    is_varlen = len(set(seq_lens)) > 1
    if is_varlen and not attention._can_run_varlen(q.device, q.dtype, q.shape[-1]):
        pytest.skip("this torch or GPU has no flash varlen kernel")
    calls = []
    real_varlen = attention._attend_varlen
    monkeypatch.setattr(attention, "_attend_varlen", lambda *args: calls.append(1) or real_varlen(*args))
    out = prefill_attention_ragged(q, k, v, RaggedPrompts.of(seq_lens, q.device, q.dtype, q.shape[-1]))
    assert len(calls) == is_varlen
    alone = torch.cat([prefill_attention(qs, ks, vs)
                       for qs, ks, vs in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens))])
    torch.testing.assert_close(out.float(), alone.float(), atol=2e-2, rtol=2e-2)


def test_cache_grows_past_its_first_buffer():
    cache = TorchKVCache(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    cache.allocate(0)
    keys = torch.arange(100 * 4, dtype=torch.float32).view(100, 1, 4)
    for t in range(100):
        cache.append(0, 0, keys[t:t + 1], -keys[t:t + 1])
    q = torch.zeros(1, 1, 4)  # uniform attention: output is the mean of all values so far
    out = cache.attend(0, [0], q, keys[:1], -keys[:1])
    expected = -(keys.sum(0) + keys[0]) / 101
    torch.testing.assert_close(out[0], expected)


def test_cache_errors_name_the_problem():
    cache = TorchKVCache(num_layers=1, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    cache.allocate(1)
    with pytest.raises(KeyError, match="already allocated"):
        cache.allocate(1)
    with pytest.raises(KeyError, match="not allocated"):
        cache.append(2, 0, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match=r"\[T, 2, 8\]"):
        cache.append(1, 0, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))
    cache.free(1)
    with pytest.raises(KeyError):
        cache.free(1)


@torch.no_grad()
def test_flat_layout_mixes_sequences_at_different_positions(tiny_model):
    """One pre/post_attention call over tokens of three sequences equals three separate runs."""
    model, _ = tiny_model
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    next_tokens = [40, 41, 42]
    separate = []
    for seq_id, (prompt, token) in enumerate(zip(prompts, next_tokens)):
        cache = TorchKVCache.for_model(model)
        cache.allocate(seq_id)
        run_tokens(model, cache, seq_id, prompt, 0)
        separate.append(model.logits(run_tokens(model, cache, seq_id, [token], len(prompt)))[0])

    cache = TorchKVCache.for_model(model)
    for seq_id, prompt in enumerate(prompts):
        cache.allocate(seq_id)
        run_tokens(model, cache, seq_id, prompt, 0)
    tokens = torch.tensor(next_tokens)
    positions = torch.tensor([len(p) for p in prompts])
    x = model.embed(tokens)
    for layer in range(model.num_layers):
        q, k, v = model.pre_attention(layer, x, positions)
        x = model.post_attention(layer, x, cache.attend(layer, [0, 1, 2], q, k, v))
    torch.testing.assert_close(model.logits(x), torch.stack(separate), atol=1e-5, rtol=1e-5)
