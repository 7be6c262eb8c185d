"""Chunked prefill's parts: attention after a prefix, chunks in place against ``prefill``, the per-step
token budget of ``PrefillQueue`` and the config field."""
from __future__ import annotations

import pytest
import torch

from fastdecode.actors.chunked_prefill import MIN_PREFILL_TOKENS, PrefillQueue
from fastdecode.actors.executor_config import ExecutorConfig
from fastdecode.actors.model import prefill_attention
from fastdecode.actors.model.attention import prefill_attention_after
from fastdecode.actors.prefill import kv_buffers, prefill, prefill_hidden
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.sequence import EventChannel, Sequence
from fastdecode.scheduler import SchedulerConfig


def make_seq(seq_id: int, num_tokens: int, outputs: tuple[int, ...] = ()) -> Sequence:
    seq = Sequence(seq_id, [3 + (seq_id * 7 + i) % 50 for i in range(num_tokens)], SamplingParams(), EventChannel())
    seq.output_ids.extend(outputs)
    return seq


def run_chunked(model, token_ids: list[int], max_num_batched_tokens: int):
    """(last logits, keys, values, chunk sizes) of one prompt prefilled alone through a PrefillQueue."""
    queue = PrefillQueue(max_num_batched_tokens)
    seq = Sequence(1, token_ids, SamplingParams(), EventChannel())
    queue.add(seq, 0)
    sizes, computed = [], None
    while computed is None:
        [(job, num_tokens)] = queue.take_step(num_decoding=0)
        sizes.append(num_tokens)
        computed = job.run_chunk(model, num_tokens)
    assert len(queue) == 0 and job.keys is None  # off the queue, its buffers handed over
    return (*computed, sizes)


def test_attention_after_a_prefix_equals_the_rows_of_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    whole = prefill_attention(q, k, v)
    for split in (0, 1, 6, 10):
        part = prefill_attention_after(q[split:], k, v)
        torch.testing.assert_close(part, whole[split:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keys and values"):
        prefill_attention_after(q[4:], k, v[:10])
    with pytest.raises(ValueError, match="keys and values"):
        prefill_attention_after(q, k[:10], v[:10])


def test_attention_reads_each_kv_head_for_its_query_group():
    """Query head h reads KV head h // G (G = Hq / Hkv), as a per-head expanded copy would, with or without a prefix."""
    torch.manual_seed(1)
    q, k, v = torch.randn(9, 8, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    expanded_k, expanded_v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    torch.testing.assert_close(prefill_attention(q, k, v), prefill_attention(q, expanded_k, expanded_v))
    torch.testing.assert_close(prefill_attention_after(q[5:], k, v),
                               prefill_attention_after(q[5:], expanded_k, expanded_v))
    with pytest.raises(ValueError, match="evenly"):
        prefill_attention(q[:, :6], torch.randn(9, 4, 16), torch.randn(9, 4, 16))


def test_a_chunk_needs_buffers_holding_what_comes_before_it(tiny_model):
    model, _ = tiny_model
    _, k, v = prefill(model, torch.tensor([5, 6, 7, 8]))
    with pytest.raises(ValueError, match="at least 5 positions"):
        prefill_hidden(model, torch.tensor([9]), 4, k, v)
    with pytest.raises(ValueError, match="needs the buffers"):
        prefill_hidden(model, torch.tensor([9]), 3)


def test_a_chunk_writes_its_kv_into_the_buffers_and_leaves_the_prefix(tiny_model):
    """The chunks of a prompt fill one pair of buffers in place (the prefix is neither copied nor changed)."""
    model, _ = tiny_model
    token_ids = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    _, whole_k, whole_v = prefill(model, token_ids)
    keys, values = kv_buffers(model, 7)
    prefill_hidden(model, token_ids[:4], 0, keys, values)
    prefix = keys[:, :4].clone()
    _, out_k, out_v = prefill_hidden(model, token_ids[4:], 4, keys, values)
    assert out_k is keys and out_v is values
    torch.testing.assert_close(keys[:, :4], prefix, atol=0, rtol=0)
    torch.testing.assert_close(keys, whole_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, whole_v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 7, 32, 45])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_prefill_matches_the_whole_prefill(tiny_model, num_tokens, chunk):
    model, _ = tiny_model
    token_ids = [3 + (i * 13) % 200 for i in range(num_tokens)]
    logits, keys, values = prefill(model, torch.tensor(token_ids))
    chunked_logits, chunked_keys, chunked_values, sizes = run_chunked(model, token_ids, chunk)
    expected_sizes = [chunk] * (num_tokens // chunk) + ([num_tokens % chunk] if num_tokens % chunk else [])
    assert sizes == expected_sizes  # 32 tokens in chunks of 16: exactly two
    torch.testing.assert_close(chunked_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked_keys, keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_values, values, atol=1e-5, rtol=1e-5)
    assert int(chunked_logits.argmax()) == int(logits.argmax())


def test_a_step_shares_its_budget_first_come_first_served():
    queue = PrefillQueue(100)
    for seq in (make_seq(1, 30), make_seq(2, 150), make_seq(3, 10)):
        queue.add(seq, 0)
    # 4 decoding: 96 tokens; 30 whole, then 66 of the 150 and nothing for the third
    assert [(job.seq.seq_id, n) for job, n in queue.take_step(num_decoding=4)] == [(1, 30), (2, 66)]
    assert 1 not in queue and 2 in queue and len(queue) == 2
    queue.job(2).num_done = 66  # as run_chunk leaves it
    # the chunked job goes on first (84 left of 98), then the next fits whole
    assert [(job.seq.seq_id, n) for job, n in queue.take_step(num_decoding=2)] == [(2, 84), (3, 10)]
    assert len(queue) == 0 and queue.take_step(num_decoding=0) == []


def test_the_budget_has_a_floor_and_zero_or_none_means_no_chunking():
    assert PrefillQueue(2048).budget(num_decoding=2000) == MIN_PREFILL_TOKENS
    assert PrefillQueue(2048).budget(num_decoding=48) == 2000
    assert PrefillQueue(8).budget(num_decoding=7) == 8  # a limit under the floor is its own floor
    for unlimited in (None, 0):
        queue = PrefillQueue(unlimited)
        assert queue.budget(num_decoding=10) is None
        queue.add(make_seq(1, 5000), 0)
        queue.add(make_seq(2, 3000), 1)
        assert [(job.node_index, n) for job, n in queue.take_step(num_decoding=10)] == [(0, 5000), (1, 3000)]


def test_a_rebuilt_sequence_prefills_prompt_and_outputs_but_the_last():
    queue = PrefillQueue(2048)
    seq = make_seq(1, 4, outputs=(60, 61, 62))
    queue.add(seq, 0)
    job = queue.job(1)
    assert job.is_resumed and job.token_ids == seq.prompt_ids + [60, 61]
    with pytest.raises(ValueError, match="already being prefilled"):
        queue.add(seq, 0)
    assert queue.drop(1) and not queue.drop(1) and queue.job(1) is None


@pytest.mark.parametrize("bad", [-1, True, 1.5, "64"])
def test_config_refuses_a_bad_token_limit(bad):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        ExecutorConfig(max_num_batched_tokens=bad)


def test_config_default_chunks_and_zero_or_none_turns_it_off():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ExecutorConfig().max_num_batched_tokens is None
    assert (ExecutorConfig().batched_tokens_for(cpu), ExecutorConfig().batched_tokens_for(gpu)) == (256, 2048)
    assert ExecutorConfig(max_num_batched_tokens=0).batched_tokens_for(gpu) is None  # 0: no chunking
    assert ExecutorConfig(max_num_batched_tokens=512).batched_tokens_for(cpu) == 512


def test_the_gpu_default_grows_with_max_num_seqs_so_a_full_batch_still_prefills(caplog):
    """Each decoding sequence takes a token of the step's budget: with 2048 and a batch of 2048 prefill would get
    its floor alone and the batch would never fill. The default is twice max_num_seqs where that is more than 2048;
    an explicit budget below max_num_seqs is taken, with a warning."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    big = ExecutorConfig(scheduler=SchedulerConfig(max_num_seqs=4096))
    assert (big.batched_tokens_for(gpu), big.batched_tokens_for(cpu)) == (8192, 256)
    assert ExecutorConfig(scheduler=SchedulerConfig(max_num_seqs=1024)).batched_tokens_for(gpu) == 2048
    assert not caplog.records
    explicit = ExecutorConfig(max_num_batched_tokens=1000, scheduler=SchedulerConfig(max_num_seqs=4096))
    assert explicit.batched_tokens_for(gpu) == 1000
    assert "below max_num_seqs 4096" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_chunk_after_a_long_prefix_makes_no_score_matrix_cuda(dtype):
    """A 2048-token chunk after 30k tokens with Llama-3-8B's heads (GQA 4): the [32, 2048, 32k] float32 scores the math
    kernel makes are 8 GiB; a fused kernel needs under 2 GiB (float32, which flash does not take, through the
    memory-efficient one with K/V expanded per query head). The result is the small case's masked reference."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    num_new, num_all = 2048, 32768

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    q, keys, values = rand(num_new, 32, 128), rand(num_all, 8, 128), rand(num_all, 8, 128)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    prefill_attention_after(q, keys, values)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2 << 30
    small_q, small_k, small_v = q[:64], keys[:256], values[:256]
    visible = torch.ones(64, 256, dtype=torch.bool, device=device).tril(192)
    expected = torch.nn.functional.scaled_dot_product_attention(
        small_q.float().transpose(0, 1), small_k.float().repeat_interleave(4, 1).transpose(0, 1),
        small_v.float().repeat_interleave(4, 1).transpose(0, 1), attn_mask=visible).transpose(0, 1)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prefill_attention_after(small_q, small_k, small_v).float(), expected,
                               atol=tolerance, rtol=tolerance)
