"""GPU KV node: batched attention against the per-sequence torch reference, slots, stats, errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastdecode.actors import gpu_kv
from fastdecode.actors.gpu_kv import GpuKVConfig, GpuKVMemoryError, GpuKVNode, gpu_kv_bytes, slot_columns
from fastdecode.actors.model.attention import TorchKVCache

LAYERS, HKV, HQ, D = 2, 2, 8, 16
TOKEN_BYTES = LAYERS * 2 * HKV * D * 4  # float32, all layers


def make_node(num_slots: int, slot_len: int = 64, device: str = "cpu", dtype=torch.float32) -> GpuKVNode:
    token_bytes = TOKEN_BYTES // 4 * dtype.itemsize
    config = GpuKVConfig(memory_bytes=num_slots * slot_columns(slot_len) * token_bytes, slot_len=slot_len,
                         is_calibrating=False)
    return GpuKVNode("gpu", config, num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, dtype=dtype,
                     device=torch.device(device))


async def check_against_reference(node: GpuKVNode, device: str, dtype, atol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    ref = TorchKVCache(LAYERS, HKV, D, dtype=torch.float32)
    prompts = {3: 5, 7: 1, 11: 9, 12: 4}
    for seq_id, num_tokens in prompts.items():
        await node.allocate([seq_id])
        ref.allocate(seq_id)
        k = torch.randn(LAYERS, num_tokens, HKV, D, generator=gen)
        v = torch.randn(LAYERS, num_tokens, HKV, D, generator=gen)
        await node.append_prompt(seq_id, k.to(device, dtype), v.to(device, dtype))
        for layer in range(LAYERS):
            ref.append(seq_id, layer, k[layer], v[layer])
    # consecutive slots (a view of the pool), then a scattered subset (a gather)
    for ids in ([3, 7, 11, 12], [12, 3], [7, 3, 11, 12], [11]):
        for layer in range(LAYERS):
            q = torch.randn(len(ids), HQ, D, generator=gen)
            k = torch.randn(len(ids), HKV, D, generator=gen)
            v = torch.randn(len(ids), HKV, D, generator=gen)
            o = await node.attend(layer, np.array(ids), q.to(device, dtype), k.to(device, dtype),
                                  v.to(device, dtype))
            expected = ref.attend(layer, ids, q, k, v)
            assert o.shape == (len(ids), HQ, D)
            torch.testing.assert_close(o.float().cpu(), expected, atol=atol, rtol=atol)


async def test_attend_matches_reference_cpu():
    await check_against_reference(make_node(6), "cpu", torch.float32, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_attend_matches_reference_cuda():
    await check_against_reference(make_node(6, device="cuda", dtype=torch.bfloat16), "cuda", torch.bfloat16, 3e-2)


async def test_slots_reused_and_stats():
    node = make_node(2, slot_len=8)
    await node.allocate([1, 2])
    with pytest.raises(MemoryError):
        await node.allocate([3])
    k = torch.ones(LAYERS, 3, HKV, D)
    await node.append_prompt(1, k, k)
    stats = await node.stats()
    assert (stats.page_size, stats.num_total_pages, stats.num_sequences) == (8, 2 * LAYERS, 2)
    assert stats.used_bytes == 3 * TOKEN_BYTES
    await node.free([1])
    await node.allocate([4])  # takes the freed slot, which starts empty
    assert (await node.stats()).used_bytes == 0
    with pytest.raises(KeyError):
        await node.free([1])


async def test_overlong_sequence_is_refused():
    node = make_node(1, slot_len=4)
    await node.allocate([1])
    with pytest.raises(ValueError, match="holds 4|would hold 5"):
        await node.append_prompt(1, torch.ones(LAYERS, 5, HKV, D), torch.ones(LAYERS, 5, HKV, D))
    await node.append_prompt(1, torch.ones(LAYERS, 4, HKV, D), torch.ones(LAYERS, 4, HKV, D))
    one = torch.ones(1, HKV, D)
    with pytest.raises(ValueError, match="outgrew"):
        await node.attend(0, np.array([1]), torch.ones(1, HQ, D), one, one)


def test_config_and_capacity_errors():
    with pytest.raises(ValueError):
        GpuKVConfig(memory_bytes=0, slot_len=8)
    with pytest.raises(ValueError, match="holds no sequence"):
        GpuKVNode("gpu", GpuKVConfig(memory_bytes=100, slot_len=8), num_layers=LAYERS, num_kv_heads=HKV,
                  head_dim=D, dtype=torch.float32, device=torch.device("cpu"))


def test_calibration_gives_a_positive_model():
    node = make_node(4, slot_len=256)
    node.calibrate()
    assert node.attn_gbps is not None and node.attn_gbps > 0
    assert node.attend_overhead_s is not None and node.attend_overhead_s >= 0
    assert not node._pool.any()  # calibration leaves the pool clean


@pytest.mark.parametrize("slot_len, num_kv_heads, dtype, memory_bytes", [
    (40, 2, torch.float32, 4 * 40 * TOKEN_BYTES),  # the bench's 32 + 8: 48 columns a slot, not 40
    (544, 2, torch.bfloat16, 6 * 544 * TOKEN_BYTES // 2),  # 560 columns
    (15, 1, torch.float32, 1 << 20),
    (16, 4, torch.float16, (1 << 20) + 12345),
    (2, 2, torch.float32, 3 * 16 * TOKEN_BYTES - 1),
])
def test_pool_never_takes_more_than_the_memory_asked(slot_len, num_kv_heads, dtype, memory_bytes):
    node = GpuKVNode("gpu", GpuKVConfig(memory_bytes=memory_bytes, slot_len=slot_len, is_calibrating=False),
                     num_layers=LAYERS, num_kv_heads=num_kv_heads, head_dim=D, dtype=dtype, device=torch.device("cpu"))
    pool_bytes = node._pool.numel() * node._pool.element_size()
    slot_bytes = pool_bytes // node.num_slots
    assert pool_bytes <= memory_bytes
    assert pool_bytes + slot_bytes > memory_bytes  # and it takes as many slots as fit
    assert slot_bytes == slot_columns(slot_len) * LAYERS * 2 * num_kv_heads * D * dtype.itemsize


def test_gpu_kv_bytes_gives_exactly_that_many_slots(tiny_model):
    model, _ = tiny_model
    for num_slots, slot_len in ((1, 2), (3, 40), (5, 48)):
        config = GpuKVConfig(memory_bytes=gpu_kv_bytes(model, num_slots, slot_len), slot_len=slot_len,
                             is_calibrating=False)
        assert GpuKVNode.for_model("gpu", model, config).num_slots == num_slots


def test_more_than_the_device_has_free_is_refused_before_allocating(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("the pool was allocated")

    monkeypatch.setattr(gpu_kv.torch, "zeros", no_allocation)
    with pytest.raises(GpuKVMemoryError, match=r"GPU KV memory of 32768.00 GiB is more than this host has available"):
        GpuKVNode("gpu", GpuKVConfig(memory_bytes=1 << 45, slot_len=8), num_layers=LAYERS, num_kv_heads=HKV,
                  head_dim=D, dtype=torch.float32, device=torch.device("cpu"))
    monkeypatch.setattr(gpu_kv, "free_memory_bytes", lambda device: 3 << 20)
    with pytest.raises(GpuKVMemoryError, match=r"of 4.00 GiB is more than this host has available \(3.0 MiB\)"):
        gpu_kv.check_gpu_kv_memory(4 << 30, torch.device("cpu"))
    gpu_kv.check_gpu_kv_memory(3 << 20, torch.device("cpu"))  # what is free fits


def test_free_memory_on_the_host_is_within_its_physical_memory():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < gpu_kv.free_memory_bytes(torch.device("cpu")) <= physical
