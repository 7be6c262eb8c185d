"""Whole prompts prefilled together in one forward pass: the same logits, K/V and prompt logprobs as each prompt
alone; how a step's prefills are cut into passes; in the Executor, one pass for prompts admitted together."""
from __future__ import annotations

import asyncio

import pytest
import torch

from executor_helpers import collect, greedy, prompt, reference_greedy, start_executor
from fastdecode.actors.chunked_prefill import PrefillJob
from fastdecode.actors.prefill_passes import forward_passes, prefill_together
from fastdecode.actors.executor import Executor
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.sequence import EventChannel, Sequence
from greedy_compare import assert_same_greedy



def make_job(seq_id: int, num_tokens: int, *, node_index: int = 0, prompt_logprobs: int | None = None) -> PrefillJob:
    params = SamplingParams(prompt_logprobs=prompt_logprobs)
    seq = Sequence(seq_id, [3 + (seq_id * 13 + i * 7) % 250 for i in range(num_tokens)], params, EventChannel())
    return PrefillJob.for_sequence(seq, node_index)


@pytest.mark.parametrize("lengths", [[5, 17, 1, 9], [6, 6, 6]], ids=["ragged", "uniform"])
def test_prompts_prefilled_together_match_each_prefilled_alone(tiny_model, lengths):
    model, _ = tiny_model
    together = [make_job(i, n, prompt_logprobs=2 if i % 2 else None) for i, n in enumerate(lengths)]
    alone = [make_job(i, n, prompt_logprobs=2 if i % 2 else None) for i, n in enumerate(lengths)]
    logits, kvs = prefill_together(together, model)
    assert logits.shape == (len(lengths), model.config.vocab_size) and len(kvs) == len(lengths)
    for row, job, single, (keys, values) in zip(logits, together, alone, kvs):
        single_logits, single_keys, single_values = single.run_chunk(model, len(single.token_ids))
        torch.testing.assert_close(row, single_logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(keys, single_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, single_values, atol=1e-5, rtol=1e-5)
        assert job.num_left == 0
        if single.prompt_logprobs is None:
            assert job.prompt_logprobs is None
            continue
        assert job.prompt_logprobs[0] is None and len(job.prompt_logprobs) == len(job.token_ids)
        for ours, theirs in zip(job.prompt_logprobs[1:], single.prompt_logprobs[1:]):
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4) and ours.rank == theirs.rank
            assert [t for t, _ in ours.top_logprobs] == [t for t, _ in theirs.top_logprobs]


def test_a_failed_pass_leaves_its_jobs_as_they_were(tiny_model, monkeypatch):
    model, _ = tiny_model
    jobs = [make_job(1, 4, prompt_logprobs=1), make_job(2, 6)]

    def out_of_memory(_hidden):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "logits", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        prefill_together(jobs, model)
    assert [job.num_done for job in jobs] == [0, 0] and jobs[0].prompt_logprobs is None
    begun = make_job(3, 6)
    begun.num_done = 2
    with pytest.raises(ValueError, match="whole prompts"):
        prefill_together([jobs[0], begun], model)


def test_a_steps_whole_prompts_share_passes_by_where_their_kv_goes():
    """Whole prompts join the open pass of their kind up to the token cap; a chunk (begun, or cut by the budget)
    is a pass of its own; order is kept."""
    begun = make_job(1, 50)
    begun.num_done = 20
    host = [make_job(i, 10) for i in (2, 3, 4, 5)]
    device = [make_job(i, 10, node_index=1) for i in (6, 7)]
    cut = make_job(8, 40)
    work = [(begun, 30), (host[0], 10), (device[0], 10), (host[1], 10), (host[2], 10), (device[1], 10),
            (host[3], 10), (cut, 25)]
    passes = forward_passes(work, 30, lambda job: job.node_index == 0)
    assert [[job.seq.seq_id for job, _ in batch] for _, batch in passes] == [[1], [2, 3, 4], [6, 7], [5], [8]]
    assert [kind for kind, _ in passes] == [True, True, False, True, True]
    assert passes[-1] == (True, [(cut, 25)]) and passes[0] == (True, [(begun, 30)])


async def test_prompts_admitted_together_are_prefilled_in_one_pass(tiny_model, monkeypatch):
    """Five prompts admitted in one step go through one forward pass (not five) and each gets the greedy tokens of
    its own reference run; the next step's prompt gets a pass of its own."""
    import fastdecode.actors.prefill_passes as prefill_module

    model, _ = tiny_model
    passes = []
    real_ragged = prefill_module.prefill_hidden_ragged

    def counted(model, tokens, prompts):
        passes.append(list(prompts.seq_lens))
        return real_ragged(model, tokens, prompts)

    monkeypatch.setattr(prefill_module, "prefill_hidden_ragged", counted)
    executor, _ = await start_executor(model, 0)
    prompts = [prompt(n, salt) for salt, n in enumerate([9, 30, 1, 14, 22])]
    try:
        streams = [executor.submit(p, greedy(12)) for p in prompts]  # in one go, before the loop runs: one admission
        outputs = await asyncio.gather(*(collect(s) for s in streams))
        later = await collect(executor.submit(prompts[0], greedy(12)))
    finally:
        await executor.stop()
    assert passes == [[9, 30, 1, 14, 22]]
    for p, (tokens, reason) in zip(prompts, outputs):
        assert reason == "length"
        assert_same_greedy(tokens, *reference_greedy(model, p, 12), label=f"a prompt of {len(p)} in a shared pass")
    assert_same_greedy(later[0], *reference_greedy(model, prompts[0], 12), label="the same prompt alone")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   NotImplementedError("Could not run 'aten::_flash_attention_forward'")],
                         ids=["out-of-memory", "other"])
async def test_a_failed_shared_pass_runs_its_prompts_one_by_one(tiny_model, monkeypatch, caplog, error):
    """The prompts of a pass that failed (out of GPU memory, or an error only the shared pass meets) are prefilled on
    their own instead, and every request still gets its reference tokens (a prompt that fails alone too ends with
    its own error: the Executor's OOM test)."""
    import fastdecode.actors.prefill_passes as steps_module

    model, _ = tiny_model

    def failing(jobs, *_):
        raise error

    monkeypatch.setattr(steps_module, "prefill_together", failing)
    executor, _ = await start_executor(model, 0)
    prompts = [prompt(n, salt) for salt, n in enumerate([12, 5, 20])]
    try:
        outputs = await asyncio.gather(*(collect(executor.submit(p, greedy(12))) for p in prompts))
    finally:
        await executor.stop()
    for p, (tokens, reason) in zip(prompts, outputs):
        assert reason == "length"
        assert_same_greedy(tokens, *reference_greedy(model, p, 12), label=f"a prompt of {len(p)} alone")
    assert "prefilling them one by one" in caplog.text and type(error).__name__ in caplog.text
