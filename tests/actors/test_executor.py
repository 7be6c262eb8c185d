"""The heterogeneous pipeline end to end (float32 on CPU): same tokens as the reference."""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import random

import pytest

from executor_helpers import collect, one_prompt_per_pass, reference_greedy, start_executor
from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.executor import ExecutorConfig
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams
from greedy_compare import assert_same_greedy

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def prompts(tokenizer) -> list[list[int]]:
    texts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def main():\n    print("]
    return [tokenizer.encode(t) for t in texts]


@pytest.fixture(scope="module")
def references(tiny_model):
    model, tokenizer = tiny_model
    return {tuple(p): reference_greedy(model, p, GREEDY.max_tokens) for p in prompts(tokenizer)}


async def run_greedy(cluster: Cluster, prompt_ids_list) -> list[list[int]]:
    results = await asyncio.gather(*(collect(cluster.submit(p, GREEDY)) for p in prompt_ids_list))
    return [tokens for tokens, _ in results]


@pytest.mark.parametrize("num_shards", [0, 1, 3], ids=["single-process", "1-shard", "3-shards"])
@pytest.mark.parametrize("is_pipelined", [True, False], ids=["pipeline", "no-pipeline"])
async def test_greedy_matches_reference(tiny_model, references, num_shards, is_pipelined):
    _, tokenizer = tiny_model
    config = ClusterConfig(**TINY, num_shards=num_shards, shard_kv_memory_bytes=16 << 20,
                           executor=ExecutorConfig(is_pipelined=is_pipelined))
    async with await Cluster.start(config) as cluster:
        outputs = await run_greedy(cluster, prompts(tokenizer))
        assert all(used == 0 for used in await cluster.kv_used_bytes())
    for prompt, ours in zip(prompts(tokenizer), outputs):
        tokens, gaps = references[tuple(prompt)]
        assert_same_greedy(ours, tokens, gaps, label=f"{num_shards} shards, pipeline={is_pipelined}")


@pytest.mark.parametrize("num_shards", [0, 1], ids=["cpu-whole-step", "shard-layered"])
async def test_a_token_reaches_its_stream_before_the_next_step_ends(num_shards):
    """A decode step that runs to its end before its await returns (on the CPU, or layer by layer over shards) hands
    the previous step's tokens to the streams before it runs, not after: they used to wait a whole step."""
    config = ClusterConfig(**TINY, num_shards=num_shards, shard_kv_memory_bytes=16 << 20)
    async with await Cluster.start(config) as cluster:
        decoder = cluster.executor.decoder
        num_finished = 0
        run = decoder.run

        async def counted_run(*args, **kwargs):
            nonlocal num_finished
            logits = await run(*args, **kwargs)
            num_finished += 1
            return logits

        decoder.run = counted_run
        finished_at = []  # decode steps finished when each token reached the stream
        async for event in cluster.submit([5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)):
            finished_at.append(num_finished)
    # token 0 comes from the prefill, token i from the i-th decode step: it is out before step i + 1 ends
    assert len(finished_at) == 6
    assert all(finished <= index for index, finished in enumerate(finished_at) if index < 5)


async def test_start_up_objects_are_frozen_while_serving_where_asked_and_handed_back_at_stop(tiny_model):
    """What start-up made stays out of the cyclic collector's passes while the cluster serves (a hybrid start
    that dropped its shards stepped 3% slower than gpu-only without it); stop() hands it back, so a process
    that starts clusters in turn frees each one's garbage. Only where the config asks (the servers do): an embedding
    app's heap, and its torch threads, are as it had them, during and after."""
    import torch

    gc.unfreeze()
    threads = torch.get_num_threads()
    config = ClusterConfig(**TINY, num_shards=1, shard_kv_memory_bytes=16 << 20)
    async with await Cluster.start(dataclasses.replace(config, is_heap_frozen=True)) as cluster:
        assert gc.get_freeze_count() > 0
        await run_greedy(cluster, [[5, 6, 7]])
    assert gc.get_freeze_count() == 0 and torch.get_num_threads() == threads
    async with await Cluster.start(config) as cluster:
        assert gc.get_freeze_count() == 0
        await run_greedy(cluster, [[5, 6, 7]])
    assert torch.get_num_threads() == threads


async def test_staggered_concurrent_requests_match_solo_runs(tiny_model):
    """16 requests of different prompt lengths and max_tokens, arriving at different
    times, greedy and seeded-sampled: each gives exactly the tokens of its solo run."""
    model, tokenizer = tiny_model
    rng = random.Random(7)
    requests = []
    for i in range(16):
        prompt = [rng.randrange(3, model.config.vocab_size) for _ in range(rng.randrange(1, 40))]
        if i % 4 == 3:
            params = SamplingParams(max_tokens=rng.randrange(8, 30), temperature=0.8, top_p=0.9, seed=100 + i,
                                    ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=rng.randrange(8, 30), temperature=0.0, ignore_eos=True)
        requests.append((prompt, params, rng.uniform(0, 0.3)))

    config = ClusterConfig(**TINY, num_shards=2, shard_kv_memory_bytes=16 << 20)
    async with await Cluster.start(config) as cluster:
        async def one(prompt, params, delay):
            await asyncio.sleep(delay)
            return await collect(cluster.submit(prompt, params))

        outputs = await asyncio.gather(*(one(*r) for r in requests))
        assert all(used == 0 for used in await cluster.kv_used_bytes())

    for (prompt, params, _), (tokens, reason) in zip(requests, outputs):
        assert reason == "length" and len(tokens) == params.max_tokens
        if params.is_greedy:
            ref_tokens, gaps = reference_greedy(model, prompt, params.max_tokens)
            assert_same_greedy(tokens, ref_tokens, gaps, label=f"prompt of {len(prompt)}")
        else:
            assert tokens == reference_generate(model, tokenizer, prompt, params).token_ids


async def test_each_stream_sees_its_events_in_order_with_aborts(tiny_model):
    """Token events leave the Executor one step late (while the next step runs): every stream still sees
    indices 0, 1, 2, ... and its final event last, whether it ends by length or by an abort."""
    _, tokenizer = tiny_model
    config = ClusterConfig(**TINY, num_shards=0)
    async with await Cluster.start(config) as cluster:
        executor = cluster.executor
        first, second = prompts(tokenizer)[:2]
        aborted = executor.submit(first, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
        finished = executor.submit(second, GREEDY)
        events = {"aborted": [], "finished": [], "late": []}

        async def read(name, stream, abort_after=None):
            async for event in stream:
                events[name].append(event)
                if len(events[name]) == abort_after:
                    executor.abort(stream.request_id)  # the stream goes on to its abort event

        await asyncio.gather(read("aborted", aborted, abort_after=3), read("finished", finished))
        await read("late", executor.submit(second, GREEDY))  # a fresh request after the others ended
    for name, reason in (("aborted", "abort"), ("finished", "length"), ("late", "length")):
        stream_events = events[name]
        tokens = [e for e in stream_events if e.token_id >= 0]
        assert [e.index for e in tokens] == list(range(len(tokens))), name
        assert [e.finish_reason for e in stream_events[:-1]] == [None] * (len(stream_events) - 1), name
        assert stream_events[-1].finish_reason == reason, name
    assert events["aborted"][-1].index == len([e for e in events["aborted"] if e.token_id >= 0])
    assert len(events["finished"]) == len(events["late"]) == GREEDY.max_tokens
    assert [e.token_id for e in events["finished"]] == [e.token_id for e in events["late"]]


async def test_cancelled_requests_free_their_kv(tiny_model):
    _, tokenizer = tiny_model
    config = ClusterConfig(**TINY, num_shards=2, shard_kv_memory_bytes=16 << 20)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    async with await Cluster.start(config) as cluster:
        streams = [cluster.submit(p, long) for p in prompts(tokenizer)]

        async def cancel_after(stream, n):
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == n:
                    await stream.aclose()
                    return seen
            return seen

        seen = await asyncio.gather(*(cancel_after(s, 5 + i) for i, s in enumerate(streams)))
        assert seen == [5, 6, 7, 8]
        for _ in range(100):  # the KV is freed at the next step boundary
            if all(used == 0 for used in await cluster.kv_used_bytes()):
                break
            await asyncio.sleep(0.02)
        assert all(used == 0 for used in await cluster.kv_used_bytes())
        assert cluster.executor.num_running == 0
        # and the cluster keeps serving
        tokens, reason = await collect(cluster.submit(prompts(tokenizer)[0], GREEDY))
        assert reason == "length" and len(tokens) == GREEDY.max_tokens


async def test_sequences_ending_in_one_step_are_freed_with_one_free_per_node(tiny_model):
    """A cohort that ends together (one max_tokens) is freed with a Free per node and mini-batch, not a round trip
    per sequence one after another while every other stream waits."""
    _, tokenizer = tiny_model
    config = ClusterConfig(**TINY, num_shards=2, shard_kv_memory_bytes=16 << 20)
    async with await Cluster.start(config) as cluster:
        frees = []
        for node in cluster.executor.nodes:
            def recording(seq_ids, node=node, free=node.free):
                frees.append((node.node_id, len(seq_ids)))
                return free(seq_ids)
            node.free = recording
        cohort = [p for p in prompts(tokenizer) for _ in range(3)]
        results = await asyncio.gather(*(collect(cluster.submit(p, GREEDY)) for p in cohort))
        assert all(reason == "length" and len(tokens) == GREEDY.max_tokens for tokens, reason in results)
        assert sum(n for _, n in frees) == len(cohort) and all(used == 0 for used in await cluster.kv_used_bytes())
        assert len(frees) <= 2 * len(cluster.executor.nodes) < len(cohort)


async def test_stopping_frees_the_kv_of_unfinished_requests_on_the_shards(tiny_model):
    """A server stopped with requests under way frees their KV on the shards (a daemon would otherwise stay busy
    with them, and refuse the next server, until their session lapsed); the requests end with a retryable error."""
    _, tokenizer = tiny_model
    config = ClusterConfig(**TINY, num_shards=2, shard_kv_memory_bytes=16 << 20)
    long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    async with await Cluster.start(config) as cluster:
        streams = [cluster.submit(p, long) for p in prompts(tokenizer)]
        for stream in streams:
            await anext(stream)
        assert sum(await cluster.kv_used_bytes()) > 0
        await cluster.executor.stop()
        assert all(used == 0 for used in await cluster.kv_used_bytes())
        ends = [[e async for e in stream][-1] for stream in streams]
        assert all(e.finish_reason == "error" and e.is_retryable for e in ends)


async def test_a_stop_string_end_counts_as_a_finish_and_a_client_gone_does_not(tiny_model):
    """Admission learns output lengths from finished requests: one ended by its stop string is one (its
    length counts), one whose client went away is not."""
    _, tokenizer = tiny_model
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    async with await Cluster.start(ClusterConfig(**TINY)) as cluster:
        admission = cluster.executor.scheduler.admission
        for is_stop in (False, True):
            stream = cluster.submit(prompts(tokenizer)[0], long)
            for _ in range(5):
                await anext(stream)
            stream.cancel(is_stop=is_stop)
            for _ in range(100):  # reaped at the next step boundary
                if cluster.executor.num_running == 0:
                    break
                await asyncio.sleep(0.02)
            assert cluster.executor.num_running == 0
            if not is_stop:
                assert admission.expected_output_len == pytest.approx(200)  # nothing learnt yet
        assert 5 <= admission.expected_output_len <= 10  # the tokens it had when it was reaped


async def test_a_context_longer_than_any_kv_node_holds():
    """The model's own context is cut to what the largest KV node holds; a longer one given is an error."""
    small = dict(TINY, model="random:smollm2-135m", num_shards=1, shard_kv_memory_bytes=8 << 20)  # 46 KB a token
    async with await Cluster.start(ClusterConfig(**small)) as cluster:
        node_tokens = cluster.executor.max_model_len
        assert 2 <= node_tokens < cluster.model.config.max_position_embeddings
        tokens, reason = await collect(cluster.submit(cluster.tokenizer.encode("Once upon a time"), GREEDY))
        assert reason == "length" and len(tokens) == GREEDY.max_tokens
    with pytest.raises(ValueError, match="does not fit the KV-cache"):
        await Cluster.start(ClusterConfig(**small, executor=ExecutorConfig(max_model_len=node_tokens + 1)))


@pytest.mark.slow
async def test_two_shard_daemons_over_tcp(tiny_model, references):
    from daemons import shard_daemons

    _, tokenizer = tiny_model
    with shard_daemons(2) as daemons:
        config = ClusterConfig(**TINY, shard_addresses=tuple(address for _, address in daemons))
        async with await Cluster.start(config) as cluster:
            outputs = await run_greedy(cluster, prompts(tokenizer))
            assert all(used == 0 for used in await cluster.kv_used_bytes())
            calls = [s.num_attend_calls for s in await asyncio.gather(*(n.client.stats() for n in cluster.executor.nodes))]
            # placement is load-aware: a daemon calibrated faster may take every short sequence
            num_layers = cluster.model.config.num_layers
            assert sum(calls) >= num_layers * (GREEDY.max_tokens - 1), f"the daemons did the attention: {calls}"
        for proc, _ in daemons:
            assert proc.poll() is None  # the daemons outlive the client
    for prompt, ours in zip(prompts(tokenizer), outputs):
        tokens, gaps = references[tuple(prompt)]
        assert_same_greedy(ours, tokens, gaps, label="2 daemons over tcp")


async def test_one_shard_daemon_given_twice_is_refused():
    """The same daemon twice (the same address, or two that reach it) would count its memory twice and overflow its
    pool: refused, naming the addresses."""
    from daemons import shard_daemons

    with shard_daemons(1) as [(_, address)]:
        with pytest.raises(ValueError, match="given twice"):
            ClusterConfig(**TINY, shard_addresses=(address, address))
        alias = address.replace("127.0.0.1", "localhost")
        with pytest.raises(ValueError, match="reach the same shard daemon"):
            await Cluster.start(ClusterConfig(**TINY, shard_addresses=(address, alias)))


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_shards", [1, 3], ids=["1-shard", "3-shards"])
@pytest.mark.parametrize("is_pipelined", [True, False], ids=["pipeline", "no-pipeline"])
async def test_greedy_matches_reference_on_cuda(num_shards, is_pipelined):
    """The Executor on CUDA (float32, TF32 off) against the single-process reference on
    the same CUDA weights (random weights differ between CPU and CUDA generators)."""
    import torch

    from fastdecode.actors.model import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = load_model(TINY["model"], dtype="float32", device="cuda", seed=TINY["seed"])
    references = {tuple(p): reference_greedy(model, p, GREEDY.max_tokens) for p in prompts(tokenizer)}
    config = ClusterConfig(**{**TINY, "device": "cuda"}, num_shards=num_shards, shard_kv_memory_bytes=16 << 20,
                           executor=ExecutorConfig(is_pipelined=is_pipelined))
    async with await Cluster.start(config) as cluster:
        assert cluster.model.device.type == "cuda"
        outputs = await run_greedy(cluster, prompts(tokenizer))
        assert all(used == 0 for used in await cluster.kv_used_bytes())
    for prompt, ours in zip(prompts(tokenizer), outputs):
        tokens, gaps = references[tuple(prompt)]
        assert_same_greedy(ours, tokens, gaps, label=f"cuda, {num_shards} shards, pipeline={is_pipelined}")


async def test_a_prompts_forward_overlaps_the_previous_prompts_placement(tiny_model, references, monkeypatch):
    """Admitted together, pass i+1's forward runs while pass i's K/V is still being shipped, and the tokens stay
    the reference's (each prompt a pass of its own here: passes of at most one token)."""
    import fastdecode.actors.chunked_prefill as prefill_module

    _, tokenizer = tiny_model
    spans: dict[str, list[tuple[float, float]]] = {"forward": [], "append": []}
    loop = asyncio.get_running_loop()
    real_prefill = prefill_module.prefill_hidden
    one_prompt_per_pass(monkeypatch)

    def timed_prefill(*args):
        start = loop.time()
        result = real_prefill(*args)
        spans["forward"].append((start, loop.time()))
        return result

    monkeypatch.setattr(prefill_module, "prefill_hidden", timed_prefill)
    config = ClusterConfig(**TINY, num_shards=1, shard_kv_memory_bytes=16 << 20)
    async with await Cluster.start(config) as cluster:
        node = cluster.executor.nodes[0]
        real_append = node.append_prompt

        async def slow_append(seq_id, k, v):
            start = loop.time()
            await asyncio.sleep(0.2)  # a slow wire
            await real_append(seq_id, k, v)
            spans["append"].append((start, loop.time()))

        node.append_prompt = slow_append
        outputs = await run_greedy(cluster, prompts(tokenizer))
    assert len(spans["forward"]) == len(spans["append"]) == len(outputs)
    overlapped = sum(1 for (start, _), (_, end) in zip(spans["forward"][1:], spans["append"]) if start < end)
    assert overlapped == len(outputs) - 1
    for prompt, ours in zip(prompts(tokenizer), outputs):
        tokens, gaps = references[tuple(prompt)]
        assert_same_greedy(ours, tokens, gaps, label="overlapped prefill")


async def test_a_shard_refusing_a_prompt_for_room_requeues_it(tiny_model, references):
    """The node had less room than the scheduler thought: that prompt is requeued and rebuilt, the others
    go on, and every request still gets the reference's tokens."""
    from fastdecode.transport.errors import RemoteRequestError

    _, tokenizer = tiny_model
    config = ClusterConfig(**TINY, num_shards=1, shard_kv_memory_bytes=16 << 20)
    async with await Cluster.start(config) as cluster:
        node = cluster.executor.nodes[0]
        real_append = node.append_prompt
        refused: list[int] = []

        async def append_once_refused(seq_id, k, v):
            if not refused:
                refused.append(seq_id)
                await real_append(seq_id, k[:, :1], v[:, :1])  # some of it landed before the node ran out
                raise RemoteRequestError("pool_full", "no free page")
            await real_append(seq_id, k, v)

        node.append_prompt = append_once_refused
        outputs = await run_greedy(cluster, prompts(tokenizer))
        assert len(refused) == 1 and cluster.executor.num_preempted == 1
        assert all(used == 0 for used in await cluster.kv_used_bytes())
    for prompt, ours in zip(prompts(tokenizer), outputs):
        tokens, gaps = references[tuple(prompt)]
        assert_same_greedy(ours, tokens, gaps, label="prompt refused once")


async def test_a_step_without_aborts_leaves_the_token_events_for_the_next_decode_launch(tiny_model):
    """The events of a step go to the streams as the next decode step starts (after its launch on CUDA), not as the
    step boundary reaps aborts, when it reaps none."""
    model, _ = tiny_model
    executor, _ = await start_executor(model, 0)
    try:
        emitted = []
        executor._held.emit = lambda *seq_ids: emitted.append(True)
        await executor._reap()
        await executor._apply_node_changes()
        assert emitted == []
    finally:
        await executor.stop()
