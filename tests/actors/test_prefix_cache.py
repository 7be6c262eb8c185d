"""Automatic prefix caching: the cache's blocks by token chain, its eviction, and the Executor (random:tiny, float32,
CPU) giving the reference's greedy tokens for a prompt whose start was cached, whole or in chunks."""
from __future__ import annotations

import pytest
import torch

from executor_helpers import collect, greedy, prompt, reference_greedy, start_executor
from fastdecode.actors.chunked_prefill import PrefillJob
from fastdecode.actors.executor import ExecutorConfig
from fastdecode.actors.prefill import prefill
from fastdecode.actors.prefix_cache import CUDA_MIN_HIT_TOKENS, PrefixCache
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.sequence import EventChannel, Sequence
from greedy_compare import assert_same_greedy

BLOCK = 4


def kv_of(token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[2 layers, T, 1 head, 2 dims]`` that say which token and layer they belong to."""
    ids = torch.tensor(token_ids, dtype=torch.float32).view(1, -1, 1, 1)
    keys = ids.expand(2, -1, 1, 2) + torch.tensor([0.0, 1000.0]).view(2, 1, 1, 1)
    return keys.clone(), -keys


def block_tokens(blocks) -> list[list[int]]:
    return [[int(t) for t in block.keys[0, :, 0, 0]] for block in blocks]


def test_a_lookup_finds_the_blocks_that_begin_the_prompt_and_leaves_its_last_token():
    cache = PrefixCache(1 << 20, BLOCK)
    tokens = list(range(10, 22))  # 3 whole blocks
    cache.insert(tokens, *kv_of(tokens))
    found = cache.lookup(tokens + [99])
    assert block_tokens(found) == [tokens[0:4], tokens[4:8], tokens[8:12]]
    keys, values = kv_of(tokens)
    assert torch.equal(found[1].keys, keys[:, 4:8]) and torch.equal(found[1].values, values[:, 4:8])
    # the prompt itself: its last token is computed, so its last whole block is not taken
    assert len(cache.lookup(tokens)) == 2
    assert cache.lookup(tokens[:4]) == []
    assert (cache.stats.queried_tokens, cache.stats.hit_tokens) == (13 + 12 + 4, 12 + 8)


def test_a_block_matches_only_behind_the_same_blocks():
    cache = PrefixCache(1 << 20, BLOCK)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    cache.insert(tokens, *kv_of(tokens))
    assert cache.lookup([9, 9, 9, 9, 5, 6, 7, 8, 0]) == []  # block 2's tokens after another block 1
    assert block_tokens(cache.lookup([1, 2, 3, 4, 5, 6, 7, 0, 0])) == [[1, 2, 3, 4]]


def test_a_prompt_of_thousands_of_blocks():
    """Each key held the whole chain before it: comparing two keys of a 32k-token prompt recursed past Python's
    limit (RecursionError) and took time quadratic in its blocks."""
    cache = PrefixCache(1 << 30, BLOCK)
    tokens = list(range(4 * 3000))
    cache.insert(tokens, *kv_of(tokens))
    found = cache.lookup(list(tokens) + [0])
    assert len(found) == 3000 and block_tokens(found[-1:]) == [tokens[-4:]]


def test_cached_blocks_are_copies():
    cache = PrefixCache(1 << 20, BLOCK)
    tokens = list(range(8))
    keys, values = kv_of(tokens)
    cache.insert(tokens, keys, values)
    keys.zero_()
    assert block_tokens(cache.lookup(tokens + [0])) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_the_least_recently_used_blocks_go_past_the_budget():
    one_block = 2 * 2 * BLOCK * 1 * 2 * 4  # K and V of 2 layers, 4 tokens, 1 head, 2 float32 dims
    cache = PrefixCache(2 * one_block, BLOCK)
    a, b, c = ([salt] * BLOCK for salt in (1, 2, 3))
    cache.insert(a, *kv_of(a))
    cache.insert(b, *kv_of(b))
    assert len(cache.lookup(a + [0])) == 1  # a is now the more recent
    cache.insert(c, *kv_of(c))
    assert (cache.stats.num_blocks, cache.stats.num_bytes) == (2, 2 * one_block)
    assert cache.lookup(b + [0]) == []
    assert len(cache.lookup(a + [0])) == 1 and len(cache.lookup(c + [0])) == 1


class Uncopyable:
    """K/V ``[2 layers, 8 tokens, 1 head, 2 dims]`` of float32 whose blocks cannot be copied: ``error`` is raised."""

    shape = (2, 8, 1, 2)

    def __init__(self, error: Exception) -> None:
        self.error = error

    def element_size(self) -> int:
        return 4

    def __getitem__(self, index):
        return self

    def clone(self):
        raise self.error


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 MiB",
                                     "DefaultCPUAllocator: can't allocate memory: you tried to allocate 64 bytes"])
def test_out_of_memory_a_prompts_blocks_are_not_kept_and_the_cache_goes_on(message):
    cache = PrefixCache(1 << 20, BLOCK)
    tokens = list(range(8))
    cache.insert(tokens, *kv_of(tokens))
    held = cache.stats.num_bytes
    full = Uncopyable(torch.OutOfMemoryError(message) if "CUDA" in message else RuntimeError(message))
    cache.insert(list(range(100, 108)), full, full)
    assert (cache.max_bytes, cache.stats.num_bytes, cache.stats.num_blocks) == (1 << 20, held, 2)
    assert len(cache.lookup(tokens + [0])) == 2
    other = list(range(200, 208))
    cache.insert(other, *kv_of(other))  # the next prompt's blocks are kept
    assert len(cache.lookup(other + [0])) == 2
    broken = Uncopyable(RuntimeError("device-side assert triggered"))
    with pytest.raises(RuntimeError, match="device-side"):  # another error is not taken for a full device
        cache.insert(list(range(300, 308)), broken, broken)


def test_a_prompt_longer_than_the_budget_keeps_its_leading_blocks():
    one_block = 2 * 2 * BLOCK * 1 * 2 * 4
    cache = PrefixCache(3 * one_block, BLOCK)
    long = list(range(5 * BLOCK))
    cache.insert(long, *kv_of(long))
    assert cache.stats.num_blocks == 3
    assert block_tokens(cache.lookup(long + [0])) == [long[0:4], long[4:8], long[8:12]]


def test_eviction_takes_a_chains_tail_first():
    one_block = 2 * 2 * BLOCK * 1 * 2 * 4
    cache = PrefixCache(4 * one_block, BLOCK)
    a, b = list(range(3 * BLOCK)), list(range(100, 100 + 3 * BLOCK))
    cache.insert(a, *kv_of(a))
    cache.insert(b, *kv_of(b))  # 6 blocks for a budget of 4: two of a's go, its last ones
    assert block_tokens(cache.lookup(a + [0])) == [a[0:4]]
    assert len(cache.lookup(b + [0])) == 3


def test_no_budget_keeps_nothing():
    cache = PrefixCache(0, BLOCK)
    cache.insert(list(range(8)), *kv_of(list(range(8))))
    assert cache.stats.num_blocks == 0 and cache.lookup(list(range(9))) == []


def test_a_prompt_logprobs_request_computes_its_whole_prompt():
    cache = PrefixCache(1 << 20, BLOCK)
    tokens = list(range(12))
    cache.insert(tokens, *kv_of(tokens))
    plain = Sequence(1, tokens + [5], SamplingParams(max_tokens=2), EventChannel())
    scored = Sequence(2, tokens + [5], SamplingParams(max_tokens=2, prompt_logprobs=1), EventChannel())
    assert PrefillJob.for_sequence(plain, 0, cache).num_done == 12
    assert PrefillJob.for_sequence(scored, 0, cache).num_done == 0


def test_a_short_hit_is_not_taken_where_a_minimum_is_set():
    cache = PrefixCache(1 << 20, BLOCK, min_hit_tokens=12)
    tokens = list(range(12))
    cache.insert(tokens, *kv_of(tokens))
    assert cache.lookup(tokens[:8] + [0]) == []  # two blocks: 8 tokens
    assert len(cache.lookup(tokens + [0])) == 3
    assert cache.stats.hit_tokens == 12


def test_the_executor_config_makes_the_cache():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ExecutorConfig(prefix_cache_bytes=0).prefix_cache(cpu) is None
    on_cpu = ExecutorConfig(prefix_cache_bytes=1 << 20).prefix_cache(cpu)
    assert (on_cpu.max_bytes, on_cpu.min_hit_tokens) == (1 << 20, 0)
    assert ExecutorConfig().prefix_cache(cuda).min_hit_tokens == CUDA_MIN_HIT_TOKENS
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        ExecutorConfig(prefix_cache_bytes=-1)


NUM_TOKENS = 12


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def tiny_on(request, tiny_model):
    """random:tiny in float32 on the CPU, and on CUDA (where its blocks are kept in GPU memory)."""
    if request.param == "cpu":
        return tiny_model[0]
    from fastdecode.actors.model import load_model

    return load_model("random:tiny", dtype="float32", device="cuda", seed=0)[0]


@pytest.mark.parametrize("limit", [0, 16], ids=["whole", "chunks-of-16"])
async def test_a_cached_prefix_gives_the_greedy_tokens_of_the_whole_prompt(tiny_on, limit):
    model = tiny_on
    first = prompt(100, 7)
    second = first + prompt(20, 8)  # begins with first's 3 whole 32-token blocks
    executor, nodes = await start_executor(model, limit)
    placed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # each prompt's K/V as placed on the node
    real_append = nodes[0].append_prompt

    async def append_prompt(seq_id, keys, values):
        placed[seq_id] = (keys.clone(), values.clone())
        await real_append(seq_id, keys, values)

    nodes[0].append_prompt = append_prompt
    try:
        cache = executor.prefills.cache
        cache.min_hit_tokens = 0  # on CUDA too: these prompts are short
        tokens_first, _ = await collect(executor.submit(first, greedy(NUM_TOKENS)))
        assert cache.stats.hit_tokens == 0 and cache.stats.num_blocks == 3
        stream = executor.submit(second, greedy(NUM_TOKENS))
        tokens_second, reason = await collect(stream)
        assert reason == "length"
        assert cache.stats.hit_tokens == 96
        with torch.no_grad():
            _, keys, values = prefill(model, torch.tensor(second, device=model.device))
        torch.testing.assert_close(placed[stream.request_id][0], keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(placed[stream.request_id][1], values, rtol=1e-5, atol=1e-5)
        # the same prompt again: all of it but its last token's block (119 // 32 = 3 blocks)
        tokens_again, _ = await collect(executor.submit(second, greedy(NUM_TOKENS)))
        assert cache.stats.hit_tokens == 96 + 96
    finally:
        await executor.stop()
    for ids, ours, label in ((first, tokens_first, "first"), (second, tokens_second, "second"),
                             (second, tokens_again, "again")):
        ref_tokens, gaps = reference_greedy(model, ids, NUM_TOKENS)
        assert_same_greedy(ours, ref_tokens, gaps, label=f"{label}, limit {limit}")


async def test_a_prefill_out_of_memory_empties_the_cache_and_runs_again(tiny_model, monkeypatch):
    model, _ = tiny_model
    first, second = prompt(100, 7), prompt(70, 9)
    executor, _ = await start_executor(model, 0)
    real_run_chunk = PrefillJob.run_chunk
    failures = []

    def run_chunk(job, *args, **kwargs):
        if job.token_ids == second and not failures:
            failures.append(job.seq.seq_id)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_run_chunk(job, *args, **kwargs)

    try:
        cache = executor.prefills.cache
        await collect(executor.submit(first, greedy(2)))
        assert cache.stats.num_blocks == 3
        monkeypatch.setattr(PrefillJob, "run_chunk", run_chunk)
        tokens, reason = await collect(executor.submit(second, greedy(NUM_TOKENS)))
    finally:
        await executor.stop()
    assert failures and reason == "length"  # it ran again, in the memory the cache held
    assert cache.stats.num_blocks == 2  # only the second prompt's: the first's were freed
    ref_tokens, gaps = reference_greedy(model, second, NUM_TOKENS)
    assert_same_greedy(tokens, ref_tokens, gaps, label="after the retry")


async def test_without_cached_blocks_a_prefill_out_of_memory_ends_its_request(tiny_model, monkeypatch):
    model, _ = tiny_model

    def run_chunk(job, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    executor, _ = await start_executor(model, 0)
    monkeypatch.setattr(PrefillJob, "run_chunk", run_chunk)
    try:
        stream = executor.submit(prompt(40, 3), greedy(4))
        events = [event async for event in stream]
    finally:
        await executor.stop()
    assert events[-1].finish_reason == "error" and "ran out of GPU memory" in events[-1].error


async def test_prompts_prefilled_together_are_cached_each(tiny_model):
    model, _ = tiny_model
    a, b = prompt(70, 1), prompt(90, 2)
    executor, _ = await start_executor(model, 0)
    passes = []
    real_take = executor.prefills.take_step
    executor.prefills.take_step = lambda num_decoding: passes.append(real_take(num_decoding)) or passes[-1]
    try:
        cache = executor.prefills.cache
        streams = [executor.submit(ids, greedy(2)) for ids in (a, b)]
        for stream in streams:
            await collect(stream)
        assert [len(work) for work in passes if work][0] == 2  # one step took both prompts
        assert cache.stats.num_blocks == 2 + 2
        tokens, _ = await collect(executor.submit(b + prompt(10, 3), greedy(NUM_TOKENS)))
        assert cache.stats.hit_tokens == 64
    finally:
        await executor.stop()
    ref_tokens, gaps = reference_greedy(model, b + prompt(10, 3), NUM_TOKENS)
    assert_same_greedy(tokens, ref_tokens, gaps, label="after a shared pass")
