"""The whole-step program of the GPU KV node (cuda_graphs.StepGraphs): eager on the CPU against the
per-sequence reference, padding rows, the eager fallback; graphed against eager on CUDA."""
from __future__ import annotations

import asyncio
import gc
import statistics

import numpy as np
import pytest
import torch

from executor_helpers import collect, reference_greedy
from fastdecode.actors.cuda_graphs import StepGraphs, bucket_for
from fastdecode.actors.executor import Executor, ExecutorConfig
from fastdecode.actors.gpu_kv import GpuKVConfig, GpuKVNode, gpu_kv_bytes
from fastdecode.actors.model import TorchKVCache
from fastdecode.actors.prefill import prefill
from fastdecode.actors.reference import run_tokens
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.trace import StepTrace
from fastdecode.scheduler import SchedulerConfig
from greedy_compare import assert_same_greedy

SLOT_LEN = 24
PROMPTS = {1: [5, 9, 2], 2: [7, 1, 4, 4, 8, 3, 6], 3: [11, 12, 13, 14, 15], 4: [3, 3]}


def make_node(model, num_slots: int, static_attention: str = "sdpa") -> GpuKVNode:
    config = GpuKVConfig(memory_bytes=gpu_kv_bytes(model, num_slots, SLOT_LEN), slot_len=SLOT_LEN,
                         is_calibrating=False,
                         static_attention=static_attention,  # traced without a compiler on the CPU
                         compile_backend="inductor" if model.device.type == "cuda" else "aot_eager")
    return GpuKVNode.for_model("gpu-kv", model, config)


async def fill(model, node: GpuKVNode, seq_ids) -> dict[int, TorchKVCache]:
    """Prefill ``seq_ids``' prompts into the node (slots in that order) and into reference caches."""
    caches = {}
    for seq_id in seq_ids:
        tokens = torch.tensor(PROMPTS[seq_id], device=model.device)
        _, k, v = prefill(model, tokens)
        await node.allocate([seq_id])
        await node.append_prompt(seq_id, k, v)
        caches[seq_id] = TorchKVCache.for_model(model)
        caches[seq_id].allocate(seq_id)
        run_tokens(model, caches[seq_id], seq_id, PROMPTS[seq_id], 0)
    return caches


def reference_logits(model, caches, seq_ids, token_ids, lengths) -> torch.Tensor:
    return torch.cat([model.logits(run_tokens(model, caches[s], s, [t], lengths[s]))
                      for s, t in zip(seq_ids, token_ids)])


@pytest.mark.parametrize("static_attention", ["sdpa", "matmul", "compiled", "flex", "auto"])
async def test_steps_match_the_reference_in_any_row_order(tiny_model, static_attention):
    model, _ = tiny_model
    node = make_node(model, 5, static_attention)
    caches = await fill(model, node, [1, 2, 3])  # slots 0, 1, 2: bucket 4 with one padding row
    graphs = StepGraphs(model, node, max_batch=4, is_graphed=False)
    lengths = {s: len(PROMPTS[s]) for s in PROMPTS}
    rng = np.random.default_rng(0)
    for order in ([1, 2, 3], [3, 1, 2], [2, 3, 1]):
        token_ids = [int(t) for t in rng.integers(0, model.config.vocab_size, len(order))]
        logits = graphs.run(np.array(order), token_ids)
        expected = reference_logits(model, caches, order, token_ids, lengths)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        for s in order:
            lengths[s] += 1
    assert (graphs.num_replays, graphs.num_fallbacks) == (3, 0)
    assert list(node._lengths[:3]) == [lengths[1], lengths[2], lengths[3]]


async def test_padding_rows_leave_other_sequences_alone(tiny_model):
    model, _ = tiny_model
    node = make_node(model, 4)
    caches = await fill(model, node, [1, 2, 3, 4])  # sequence 4 (slot 3) is padding in a step of 1, 2, 3
    before = node._pool[:, :, 3, :, :SLOT_LEN].clone()
    graphs = StepGraphs(model, node, max_batch=4, is_graphed=False)
    logits = graphs.run(np.array([1, 2, 3]), [4, 5, 6])
    torch.testing.assert_close(logits, reference_logits(model, caches, [1, 2, 3], [4, 5, 6],
                                                        {s: len(PROMPTS[s]) for s in PROMPTS}), atol=1e-4, rtol=1e-4)
    assert torch.equal(node._pool[:, :, 3, :, :SLOT_LEN], before)
    assert int(node._lengths[3]) == len(PROMPTS[4])


async def test_slots_past_the_top_bucket_fall_back_untouched(tiny_model):
    model, _ = tiny_model
    node = make_node(model, 4)
    await fill(model, node, [1, 2, 3])
    graphs = StepGraphs(model, node, max_batch=2, is_graphed=False)
    saved = node._lengths.copy()
    assert graphs.run(np.array([3]), [1]) is None  # slot 2: past the top bucket of 2 rows
    assert graphs.num_fallbacks == 1 and np.array_equal(node._lengths, saved)
    assert graphs.rows_for(np.array([0, 2])) is None and graphs.rows_for(np.array([1, 0])) == 2
    wider = StepGraphs(model, node, max_batch=4, is_graphed=False)
    assert wider.rows_for(np.array([2])) == 4 and wider.rows_for(np.array([0, 2])) == 4  # a larger bucket
    assert bucket_for(3) == 4 and bucket_for(1) == 1
    assert StepGraphs(model, make_node(model, 3), max_batch=64, is_graphed=False).max_rows == 3  # top bucket
    with pytest.raises(ValueError, match="static_attention"):
        GpuKVConfig(memory_bytes=1 << 20, slot_len=8, static_attention="flash")


async def test_executor_with_step_graphs_matches_reference(tiny_model):
    """The Executor's decode steps through StepGraphs (eager program) give the reference's greedy tokens."""
    model, _ = tiny_model
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    node = make_node(model, 4)
    config = ExecutorConfig(max_model_len=SLOT_LEN, is_pipelined=False, profile_batches=(1, 4),  # profiled first
                            scheduler=SchedulerConfig(max_num_seqs=4, admission="all-at-once"))
    executor = Executor(model, [node], config, eos_token_ids=())
    executor.decoder.graphs = StepGraphs(model, node, max_batch=4, is_graphed=False)
    await executor.start()
    try:
        prompts = [PROMPTS[s] for s in (1, 2, 3)]
        results = await asyncio.gather(*(collect(executor.submit(p, params)) for p in prompts))
    finally:
        await executor.stop()
    assert executor.decoder.graphs.num_replays >= params.max_tokens - 1
    for prompt, (tokens, _) in zip(prompts, results):
        expected, gaps = reference_greedy(model, prompt, params.max_tokens)
        assert_same_greedy(tokens, expected, gaps, label="step graphs", min_compared=6)


async def three_cuda_steps(model, *, is_graphed: bool, profile_batches: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Logits of three decode steps of sequences 1-3 on a fresh node, optionally after profiling replays."""
    node = make_node(model, 4, "matmul")
    await fill(model, node, [1, 2, 3])
    graphs = StepGraphs(model, node, max_batch=4, is_graphed=is_graphed)
    if profile_batches:
        samples = graphs.profile(profile_batches)
        assert [b for b, _ in samples] == list(profile_batches) and all(s > 0 for _, s in samples)
    return [graphs.run(np.array([1, 2, 3]), [t, t + 1, t + 2]).float().cpu() for t in range(3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_graph_replay_matches_eager_program_cuda():
    from fastdecode.actors.model import load_model

    model, _ = load_model("random:tiny", dtype="bfloat16", device="cuda", seed=0)
    eager = await three_cuda_steps(model, is_graphed=False)
    graphed = await three_cuda_steps(model, is_graphed=True)
    for e, g in zip(eager, graphed):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


async def test_the_scheduler_predicts_whole_steps_from_timed_replays_and_learns_them(tiny_model, one_torch_thread):
    """Executor start-up times the step program by batch (StepGraphs.profile) for the GPU KV node's
    whole-step model; measured steps keep it within 15% of the steps that run."""
    model, _ = tiny_model
    slot_len, max_tokens = 64, 50
    node = GpuKVNode.for_model("gpu-kv", model, GpuKVConfig(memory_bytes=gpu_kv_bytes(model, 4, slot_len),
                                                             slot_len=slot_len, is_calibrating=False))
    config = ExecutorConfig(max_model_len=slot_len, is_pipelined=False, profile_batches=(1, 4),
                            scheduler=SchedulerConfig(max_num_seqs=4, admission="all-at-once"))
    executor = Executor(model, [node], config, eos_token_ids=(), trace=StepTrace())
    executor.decoder.graphs = StepGraphs(model, node, max_batch=4, is_graphed=False)
    # sub-millisecond steps: in the whole suite's heap a cyclic collection is a large share of one, so the timed
    # steps run without it (collected first), and the figures are the steps' own
    gc.collect()
    gc.disable()
    await executor.start()
    try:
        whole_step = executor.scheduler.nodes[0].whole_step
        assert whole_step is not None
        assert [batch for batch, _ in whole_step.samples] == [1, 4]
        assert all(seconds > 0 for _, seconds in whole_step.samples)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        await asyncio.gather(*(collect(executor.submit(PROMPTS[s], params)) for s in PROMPTS))
    finally:
        gc.enable()
        await executor.stop()
    assert whole_step.errors.num_observations >= max_tokens - 2
    measured = [end - start for _, start, end, _ in executor.trace.steps][10:]  # the learning's first steps aside
    predicted = executor.predicted_steps_s[10:]
    assert abs(statistics.median(predicted) / statistics.median(measured) - 1) < 0.15


def test_a_profile_attends_its_rows_over_the_context_it_is_given(tiny_model, monkeypatch):
    """StepGraphs.profile(context_len=L) runs the batch's rows at length L (the bucket's spare rows stay
    padding), so attention that stops at a row's length pays the planned KV reading; L is checked."""
    from fastdecode.actors import cuda_graphs

    model, _ = tiny_model
    graphs = StepGraphs(model, make_node(model, 4), max_batch=4, is_graphed=False)
    seen = []
    program = cuda_graphs.step_program
    monkeypatch.setattr(cuda_graphs, "step_program",
                        lambda m, n, inputs: seen.append(inputs[3].tolist()) or program(m, n, inputs))
    graphs.profile([3], context_len=SLOT_LEN, repeats=1)
    assert seen == [[SLOT_LEN] * 3 + [1]] * 2  # the warm-up and one timed run
    seen.clear()
    graphs.profile([3], repeats=1)
    assert seen == [[1] * 4] * 2
    for context_len in (0, SLOT_LEN + 1):
        with pytest.raises(ValueError, match="context_len"):
            graphs.profile([3], context_len=context_len)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_profile_at_a_long_context_pays_the_kv_reading_cuda():
    """On CUDA the default static attention stops at each row's length: a whole step timed at 8k tokens
    per row reads 32 slots' KV (6 GB at SmolLM2-135M's shapes) and takes longer than one at length 1."""
    from fastdecode.actors.model import load_model

    model, _ = load_model("random:smollm2-135m", dtype="bfloat16", device="cuda", seed=0)
    slot_len, rows = 8192, 32
    node = GpuKVNode.for_model("gpu-kv", model, GpuKVConfig(memory_bytes=gpu_kv_bytes(model, rows, slot_len),
                                                             slot_len=slot_len, is_calibrating=False))
    graphs = StepGraphs(model, node, max_batch=rows)
    [(_, short_s)] = graphs.profile([rows])
    [(_, long_s)] = graphs.profile([rows], context_len=slot_len)
    kv_bytes = rows * slot_len * model.config.kv_bytes_per_token(model.dtype.itemsize)
    assert long_s - short_s > kv_bytes / 8e12, (short_s, long_s)  # no GPU reads HBM at 8 TB/s


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_profiled_replays_leave_the_slots_as_they_were_cuda():
    """StepGraphs.profile replays padding-only buckets: real rows decode afterwards as if it never ran."""
    from fastdecode.actors.model import load_model

    model, _ = load_model("random:tiny", dtype="bfloat16", device="cuda", seed=0)
    plain = await three_cuda_steps(model, is_graphed=True)
    profiled = await three_cuda_steps(model, is_graphed=True, profile_batches=(1, 2, 4))
    for p, q in zip(plain, profiled):
        torch.testing.assert_close(q, p, atol=0, rtol=0)


async def test_a_step_launched_ahead_is_taken_for_its_rows_or_a_subset_and_discarded_otherwise(tiny_model):
    """StepGraphs.launch_ahead runs the next step with device-fed tokens; run() takes it for the same rows
    (or fewer) at the same tokens, and otherwise discards it and replays, the logits always the reference's."""
    model, _ = tiny_model
    node = make_node(model, 4)
    caches = await fill(model, node, [1, 2, 3])
    graphs = StepGraphs(model, node, max_batch=4, is_graphed=False)
    lengths = {s: len(PROMPTS[s]) for s in PROMPTS}

    def step(order, token_ids):
        logits = graphs.run(np.array(order), token_ids)
        torch.testing.assert_close(logits, reference_logits(model, caches, order, token_ids, lengths),
                                   atol=1e-4, rtol=1e-4)
        for s in order:
            lengths[s] += 1
        return logits

    def ahead(order, token_ids):
        assert graphs.launch_ahead(np.array(order), torch.tensor(token_ids))
        graphs.confirm_ahead(token_ids)

    step([1, 2, 3], [4, 5, 6])
    ahead([1, 2, 3], [7, 8, 9])
    assert list(node._lengths[:3]) == [lengths[1], lengths[2], lengths[3]]  # nothing advanced yet
    step([1, 2, 3], [7, 8, 9])
    assert (graphs.num_ahead_taken, graphs.num_ahead_discarded) == (1, 0)
    ahead([1, 2, 3], [10, 11, 12])
    step([2, 1], [11, 10])  # sequence 3 finished meanwhile: a subset, in another order
    assert (graphs.num_ahead_taken, graphs.num_ahead_discarded) == (2, 0)
    ahead([2, 1], [1, 2])
    step([2, 1], [1, 3])  # another token than the one fed: discarded, replayed
    ahead([2, 1], [4, 5])
    step([1, 2, 3], [5, 4, 6])  # a row the step launched ahead did not run
    ahead([1, 2, 3], [7, 7, 7])
    assert graphs.num_ahead_discarded == 2
    before = node._lengths.copy()
    await node.free([3])  # a row leaves; its slot's next owner writes after the discarded step
    caches.pop(3)
    await node.allocate([4])
    tokens = torch.tensor(PROMPTS[4])
    _, k, v = prefill(model, tokens)
    await node.append_prompt(4, k, v)
    caches.update(await fill_reference(model, [4]))
    step([1, 2, 4], [7, 7, 1])
    assert graphs.num_ahead_discarded == 3 and node._lengths[0] == before[0] + 1
    assert graphs.num_replays == 6


async def fill_reference(model, seq_ids) -> dict[int, TorchKVCache]:
    caches = {}
    for seq_id in seq_ids:
        caches[seq_id] = TorchKVCache.for_model(model)
        caches[seq_id].allocate(seq_id)
        run_tokens(model, caches[seq_id], seq_id, PROMPTS[seq_id], 0)
    return caches


async def runs_with_and_without_launching_ahead(model, temperature: float, *, is_graphed: bool):
    """Three requests finishing at different steps, with the next step launched ahead and without: their
    tokens, and (taken, discarded) launches of each."""
    results, counters = {}, {}
    for is_ahead in (False, True):
        node = make_node(model, 4, "matmul")
        config = ExecutorConfig(max_model_len=SLOT_LEN, is_pipelined=False, is_launching_ahead=is_ahead,
                                scheduler=SchedulerConfig(max_num_seqs=4, admission="all-at-once"))
        executor = Executor(model, [node], config, eos_token_ids=())
        executor.decoder.graphs = StepGraphs(model, node, max_batch=4, is_graphed=is_graphed)
        await executor.start()
        try:
            streams = [executor.submit(PROMPTS[s], SamplingParams(max_tokens=6 + 3 * s, temperature=temperature,
                                                                  seed=s, ignore_eos=True))
                       for s in (1, 2, 3)]
            results[is_ahead] = await asyncio.gather(*(collect(stream) for stream in streams))
        finally:
            await executor.stop()
        graphs = executor.decoder.graphs
        counters[is_ahead] = (graphs.num_ahead_taken, graphs.num_ahead_discarded)
    return results, counters


@pytest.mark.parametrize("temperature", [0.0, 0.8])
async def test_executor_launching_ahead_gives_the_tokens_of_one_that_does_not(tiny_model, temperature):
    """Rows finishing at different steps, and seeded sampling: the same tokens with the next step launched
    ahead as without, and most steps taken from the launch ahead."""
    model, _ = tiny_model
    results, counters = await runs_with_and_without_launching_ahead(model, temperature, is_graphed=False)
    assert results[True] == results[False]
    assert [len(tokens) for tokens, _ in results[True]] == [9, 12, 15]
    assert counters[False] == (0, 0)
    taken, discarded = counters[True]
    assert taken >= 11 and discarded <= 1  # 14 decode steps; only the last step's launch is never used


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_executor_launching_ahead_of_graph_replays_cuda():
    """The same on CUDA with graph replays: tokens fed on the device, read back on the copy stream."""
    from fastdecode.actors.model import load_model

    model, _ = load_model("random:tiny", dtype="bfloat16", device="cuda", seed=0)
    for temperature in (0.0, 0.8):
        results, counters = await runs_with_and_without_launching_ahead(model, temperature, is_graphed=True)
        assert results[True] == results[False]
        assert counters[True][0] >= 11 and counters[True][1] <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_compiled_and_flex_static_attentions_match_the_matmul_one_cuda():
    """static_attention "compiled" (inductor), "flex" (flex_attention's decoding kernel under a block mask
    from the lengths) and "auto" replay the same steps as the eager matmul form, within bf16."""
    from fastdecode.actors.model import load_model

    model, _ = load_model("random:tiny", dtype="bfloat16", device="cuda", seed=0)
    steps = {}
    kinds = ("matmul", "compiled", "flex", "auto")
    for kind in kinds:
        node = make_node(model, 4, kind)
        await fill(model, node, [1, 2, 3])
        graphs = StepGraphs(model, node, max_batch=4)
        steps[kind] = [graphs.run(np.array([1, 2, 3]), [t, t + 1, t + 2]).float().cpu() for t in range(3)]
    for kind in kinds[1:]:
        for m, c in zip(steps["matmul"], steps[kind]):
            torch.testing.assert_close(c, m, atol=0.05 * float(m.abs().max()), rtol=0.05)
