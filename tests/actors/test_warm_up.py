"""The start-up warm-up compiles what the first requests would (actors/warm_up.py): after it, requests of any
prompt length, batch size and chunking compile nothing, and give the tokens of an eager run.

CPU stand-in for the CUDA server: the model's dense segments compiled with ``aot_eager`` (no compiler needed),
one in-process shard, so decode steps feed the segments attention outputs the way a shard's come back."""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch._dynamo.utils import counters

from executor_helpers import collect
from fastdecode.actors import cluster as cluster_module
from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.executor import ExecutorConfig
from fastdecode.actors.model import load_model
from fastdecode.actors.request import SamplingParams

# prompt lengths: one alone, then four at once (batches of 2 and more), then one past the chunk budget of 64
ALONE, TOGETHER, CHUNKED = [5], [3, 9, 17, 30], [150]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def _serve(model, tokenizer, monkeypatch, *, is_warmed_up: bool) -> tuple[int, int, list[list[int]]]:
    """Compiled graphs after the start and after the requests, and the requests' tokens."""
    monkeypatch.setattr(cluster_module, "load_model", lambda *args, **kwargs: (model, tokenizer))
    config = ClusterConfig(model="random:tiny", seed=0, dtype="float32", device="cpu", num_shards=1,
                           shard_kv_memory_bytes=16 << 20,
                           executor=ExecutorConfig(is_warmed_up=is_warmed_up, max_num_batched_tokens=64))
    outputs = []
    async with await Cluster.start(config) as cluster:
        after_start = counters["stats"]["unique_graphs"]
        for lengths in (ALONE, TOGETHER, CHUNKED):
            results = await asyncio.gather(*(collect(cluster.submit(_prompt(n, n), PARAMS)) for n in lengths))
            outputs += [tokens for tokens, _ in results]
        return after_start, counters["stats"]["unique_graphs"], outputs


@pytest.fixture
def compiled_tiny():
    """A fresh random:tiny whose dense segments go through torch.compile (aot_eager), with dynamo's caches
    emptied so that nothing compiled by an earlier test is reused."""
    torch._dynamo.reset()
    model, tokenizer = load_model("random:tiny", dtype="float32", device="cpu", seed=0)
    model.compile_dense(backend="aot_eager")
    yield model, tokenizer
    torch._dynamo.reset()


async def test_after_the_warm_up_no_request_compiles(compiled_tiny, monkeypatch):
    model, tokenizer = compiled_tiny
    before = counters["stats"]["unique_graphs"]
    after_start, after_requests, outputs = await _serve(model, tokenizer, monkeypatch, is_warmed_up=True)
    # the warm-up compiled each dense segment for one row and for two or more, prompts and steps alike (a
    # prompt's attention output in the step's layout: no graphs of its own)
    assert after_start - before == 4
    assert after_requests == after_start
    # the same tokens as the eager segments give
    model.compile_dense(False)
    _, _, eager = await _serve(model, tokenizer, monkeypatch, is_warmed_up=True)
    assert outputs == eager


async def test_without_the_warm_up_the_first_requests_compile(compiled_tiny, monkeypatch):
    model, tokenizer = compiled_tiny
    after_start, after_requests, _ = await _serve(model, tokenizer, monkeypatch, is_warmed_up=False)
    assert after_requests > after_start


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["shards", "gpu-only", None])
async def test_on_cuda_no_request_compiles_after_the_warm_up(mode):
    """The CUDA server as it starts: inductor segments, CUDA graphs of the shard path's segments (shards) or of
    whole steps on the GPU KV node (gpu-only), or eager steps over torch's KV on the GPU (None, no shards)."""
    torch._dynamo.reset()
    config = ClusterConfig(model="random:tiny", seed=0, dtype="bfloat16", device="cuda", mode=mode,
                           num_shards=1 if mode == "shards" else 0, shard_kv_memory_bytes=16 << 20,
                           gpu_kv_memory_bytes=64 << 20, executor=ExecutorConfig(max_num_batched_tokens=64))
    async with await Cluster.start(config) as cluster:
        assert cluster.model.is_dense_compiled
        after_start = counters["stats"]["unique_graphs"]
        for lengths in (ALONE, TOGETHER, CHUNKED):
            results = await asyncio.gather(*(collect(cluster.submit(_prompt(n, n), PARAMS)) for n in lengths))
            assert all(len(tokens) == PARAMS.max_tokens for tokens, _ in results)
        assert counters["stats"]["unique_graphs"] == after_start
    torch._dynamo.reset()
