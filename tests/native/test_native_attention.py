"""Fused append+attend against a float64 NumPy reference: every ISA, dtype, GQA group and head dim."""
from __future__ import annotations

import numpy as np
import pytest

from fastdecode.native.lib import KVPool

from native_reference import DTYPES, ISAS, attention_reference, random_kv

TOLERANCE = {"float32": 2e-5, "float16": 1e-3, "bfloat16": 8e-3}   # output rounding dominates


def run_attend(rng, *, isa, kv_dtype, q_dtype, group, head_dim, lengths, num_kv_heads=2, page_size=32,
               out_dtype=None, num_threads=2, chunk_tokens=512, key_scale=None):
    """Caches lengths[b]-1 tokens per sequence, then one attend that appends the last token.
    key_scale: per-token factors for the keys (see random_kv). Returns (o, lse, o_ref, lse_ref)."""
    capacity = sum(-(-n // page_size) for n in lengths) * 2 * num_kv_heads * head_dim * page_size * 4
    num_q_heads = num_kv_heads * group
    with KVPool(num_layers=2, num_kv_heads=num_kv_heads, head_dim=head_dim, kv_dtype=kv_dtype,
                capacity_bytes=capacity, page_size=page_size, num_threads=num_threads, isa=isa,
                chunk_tokens=chunk_tokens) as pool:
        keys, values = [], []
        for seq_id, n in enumerate(lengths):
            pool.allocate(seq_id)
            k, v, k_ref, v_ref = random_kv(rng, (n, num_kv_heads, head_dim), kv_dtype, q_dtype, key_scale)
            pool.append(seq_id, 1, k[:-1], v[:-1])
            keys.append(k_ref)
            values.append(v_ref)
        k_new = np.stack([k[-1] for k in keys]).astype(np.float32).astype(DTYPES[q_dtype])
        v_new = np.stack([v[-1] for v in values]).astype(np.float32).astype(DTYPES[q_dtype])
        q = rng.standard_normal((len(lengths), num_q_heads, head_dim), dtype=np.float32).astype(DTYPES[q_dtype])
        out = np.empty(q.shape, DTYPES[out_dtype or q_dtype])
        lse = np.empty(q.shape[:2], np.float32)
        result = pool.attend(1, np.arange(len(lengths)), q, k_new, v_new, out=out, lse=lse)
        assert result is out
        assert [pool.seq_len(i, 1) for i in range(len(lengths))] == list(lengths)
        assert [pool.seq_len(i, 0) for i in range(len(lengths))] == [0] * len(lengths)
    o_ref, lse_ref = attention_reference(q, keys, values)
    return out, lse, o_ref, lse_ref


def assert_close(out, lse, o_ref, lse_ref, out_dtype):
    tol = TOLERANCE[out_dtype]
    np.testing.assert_allclose(out.astype(np.float64), o_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, lse_ref, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("q_dtype", list(DTYPES))
@pytest.mark.parametrize("kv_dtype", list(DTYPES))
@pytest.mark.parametrize("isa", ISAS)
def test_page_boundaries_every_path(rng, isa, kv_dtype, q_dtype, group, head_dim):
    lengths = [1, 31, 32, 33]     # 1, page-1, page, page+1 with the default page of 32
    out, lse, o_ref, lse_ref = run_attend(rng, isa=isa, kv_dtype=kv_dtype, q_dtype=q_dtype, group=group,
                                          head_dim=head_dim, lengths=lengths)
    assert out.dtype == DTYPES[q_dtype]
    assert_close(out, lse, o_ref, lse_ref, q_dtype)


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("isa", ISAS)
def test_other_page_sizes_and_odd_groups(rng, isa, page_size):
    lengths = [1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5]
    for group in (2, 3, 5):
        out, lse, o_ref, lse_ref = run_attend(rng, isa=isa, kv_dtype="bfloat16", q_dtype="float32", group=group,
                                              head_dim=128, lengths=lengths, page_size=page_size,
                                              chunk_tokens=4 * page_size)
        assert_close(out, lse, o_ref, lse_ref, "float32")


@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", ISAS)
def test_narrower_last_layout_tiles(rng, isa, q_dtype):
    # bf16 blocks are tiled by 32 tokens (K) and 64 head dims (V): a page of 48 tokens and a head dim of 80
    # end in narrower tiles; bf16 q with bf16 output also takes the bf16 P.V kernel where there is one.
    lengths = [1, 47, 48, 49, 150]
    out, lse, o_ref, lse_ref = run_attend(rng, isa=isa, kv_dtype="bfloat16", q_dtype=q_dtype, group=4,
                                          head_dim=80, lengths=lengths, page_size=48, chunk_tokens=96)
    assert_close(out, lse, o_ref, lse_ref, q_dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", ISAS)
def test_scores_that_climb_past_the_running_max(rng, isa, dtype):
    # The kernels keep a row's running max while a page's scores stay within a margin above it and move
    # it (rescaling the row) only past that: keys that grow along the sequence, with two spikes, make
    # the max climb in small steps and in large jumps, inside chunks and across them.
    key_scale = np.linspace(0.5, 6.0, 1100)
    key_scale[[100, 101, 700]] = 20.0
    out, lse, o_ref, lse_ref = run_attend(rng, isa=isa, kv_dtype=dtype, q_dtype=dtype, group=4, head_dim=128,
                                          lengths=[40, 300, 1100], key_scale=key_scale)
    assert_close(out, lse, o_ref, lse_ref, dtype)


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_output_dtype_may_differ_from_q(rng, out_dtype):
    out, lse, o_ref, lse_ref = run_attend(rng, isa=ISAS[-1], kv_dtype="float16", q_dtype="float16", group=4,
                                          head_dim=128, lengths=[5, 70], out_dtype=out_dtype)
    assert out.dtype == DTYPES[out_dtype]
    assert_close(out, lse, o_ref, lse_ref, out_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISAS)
def test_single_32k_sequence(rng, isa):
    out, lse, o_ref, lse_ref = run_attend(rng, isa=isa, kv_dtype="bfloat16", q_dtype="bfloat16", group=4,
                                          head_dim=128, lengths=[32768])
    assert_close(out, lse, o_ref, lse_ref, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize(("isa", "kv_dtype", "q_dtype"),
                         [(isa, "bfloat16", "float32") for isa in ISAS] + [(ISAS[-1], "float16", "float16"),
                                                                            (ISAS[-1], "float32", "bfloat16")])
def test_ragged_batch_up_to_32k_tokens(rng, isa, kv_dtype, q_dtype):
    lengths = [1, 33, 511, 512, 513, 2000, 7000, 22198]   # 32768 tokens in all
    assert sum(lengths) == 32768
    out, lse, o_ref, lse_ref = run_attend(rng, isa=isa, kv_dtype=kv_dtype, q_dtype=q_dtype, group=8,
                                          head_dim=64, lengths=lengths)
    assert_close(out, lse, o_ref, lse_ref, q_dtype)


@pytest.mark.parametrize(("page_size", "head_dim"), [(32, 128), (48, 80), (64, 64), (16, 128)])
@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", ISAS)
def test_decode_steps_and_appends_through_part_filled_k_tiles(rng, isa, q_dtype, page_size, head_dim):
    # A bf16 K tile that its page's tokens do not fill yet is held by rows and rewritten into pairs when its
    # last token arrives: by a decode step's write, or by a bulk append that fills it (from 0 rows or from
    # some). Every step's output and the read-back must match whatever path filled the tiles.
    num_kv_heads, group = 2, 4
    pieces = [[5, 40], [31], [page_size], [1, 1, 30]]   # bulk appends per sequence before the steps
    extra = {12: (0, 7), 20: (2, page_size + 3)}          # step -> (sequence, tokens appended in bulk)
    num_steps = 40
    total = [sum(p) + num_steps + sum(n for s, n in extra.values() if s == b) for b, p in enumerate(pieces)]
    capacity = sum(-(-n // page_size) for n in total) * 2 * num_kv_heads * head_dim * page_size * 2
    tol = TOLERANCE[q_dtype]
    with KVPool(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, kv_dtype="bfloat16",
                capacity_bytes=capacity, page_size=page_size, num_threads=2, isa=isa,
                chunk_tokens=2 * page_size) as pool:
        keys = [np.empty((0, num_kv_heads, head_dim)) for _ in pieces]
        values = [np.empty((0, num_kv_heads, head_dim)) for _ in pieces]

        def append(b, n):
            k, v, k_ref, v_ref = random_kv(rng, (n, num_kv_heads, head_dim), "bfloat16", q_dtype)
            pool.append(b, 0, k, v)
            keys[b], values[b] = np.concatenate([keys[b], k_ref]), np.concatenate([values[b], v_ref])

        for b, piece_lengths in enumerate(pieces):
            pool.allocate(b)
            for n in piece_lengths:
                append(b, n)
        ids = np.arange(len(pieces))
        for step in range(num_steps):
            if step in extra:
                append(*extra[step])
            k_new, v_new, k_ref, v_ref = random_kv(rng, (len(pieces), num_kv_heads, head_dim), "bfloat16", q_dtype)
            for b in ids:
                keys[b], values[b] = np.concatenate([keys[b], k_ref[b:b + 1]]), np.concatenate([values[b], v_ref[b:b + 1]])
            q = rng.standard_normal((len(pieces), num_kv_heads * group, head_dim), np.float32).astype(DTYPES[q_dtype])
            out = np.empty(q.shape, DTYPES[q_dtype])
            lse = np.empty(q.shape[:2], np.float32)
            pool.attend(0, ids, q, k_new, v_new, out=out, lse=lse)
            o_ref, lse_ref = attention_reference(q, keys, values)
            np.testing.assert_allclose(out.astype(np.float64), o_ref, rtol=tol, atol=tol, err_msg=f"step {step}")
            np.testing.assert_allclose(lse, lse_ref, rtol=2e-6, atol=2e-5, err_msg=f"step {step}")
        for b in ids:
            k_out, v_out = pool.read(b, 0)
            np.testing.assert_array_equal(k_out, keys[b].astype(np.float32))
            np.testing.assert_array_equal(v_out, values[b].astype(np.float32))


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("head_dim", "page_size"), [(96, 48), (64, 32), (128, 64)])
@pytest.mark.parametrize("isa", ISAS)
def test_bf16_q_groups_head_dims_and_page_sizes(rng, isa, head_dim, page_size, out_dtype):
    # bf16 q and KV: the paths that take q as the caller sent it (tile products where there are AMX units) over
    # groups of 2, 3 and 6 query heads, a head dim with a narrower last V tile (96), a page with a narrower last
    # K tile (48), full and part-filled pages.
    lengths = [1, page_size - 1, page_size, page_size + 1, 3 * page_size + 7, 200]
    for group in (2, 3, 6):
        out, lse, o_ref, lse_ref = run_attend(rng, isa=isa, kv_dtype="bfloat16", q_dtype="bfloat16", group=group,
                                              head_dim=head_dim, lengths=lengths, page_size=page_size,
                                              chunk_tokens=2 * page_size, out_dtype=out_dtype)
        assert_close(out, lse, o_ref, lse_ref, out_dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_degenerate_rows_of_one_chunk_finish_as_merged_ones(isa):
    # A sequence of one chunk is finished straight from its state, a longer one by merging its chunks, and both
    # must finish a row the same way. Scores that all overflow to -inf give a NaN row with lse -inf (torch's SDPA
    # gives NaN too) however many chunks: a shortcut for one chunk once answered 1.0 here (an lse of NaN on the
    # generic path). A row whose weighted values underflow finishes as zeros with the right lse.
    head_dim = 16

    def attend(num_cached, q_row, k_row, v_cached, v_new, k_cached=0.0):
        with KVPool(num_layers=1, num_kv_heads=1, head_dim=head_dim, kv_dtype="float32", capacity_bytes=1 << 20,
                    page_size=16, num_threads=2, isa=isa, chunk_tokens=64) as pool:
            pool.allocate(0)
            pool.append(0, 0, np.full((num_cached, 1, head_dim), k_cached, np.float32),
                        np.full((num_cached, 1, head_dim), v_cached, np.float32))
            lse = np.empty((1, 1), np.float32)
            out = pool.attend(0, np.array([0]), q_row.reshape(1, 1, head_dim), k_row.reshape(1, 1, head_dim),
                              np.full((1, 1, head_dim), v_new, np.float32), lse=lse)
            return out, lse[0, 0]

    huge = np.full(head_dim, 1e30, np.float32)
    for num_cached in (1, 4 * 64):   # one chunk of 64 tokens, then five
        out, lse = attend(num_cached, huge, -huge, 1.0, 1.0, k_cached=-1e30)
        assert np.isnan(out).all() and lse == -np.inf, (num_cached, out, lse)
    # token 0: score 0, value -1e-20 (its weight exp(-80) times it underflows to -0.0); new token: score 80, value -0
    q, k = np.zeros(head_dim, np.float32), np.zeros(head_dim, np.float32)
    q[0], k[0] = 1.0, 320.0
    out, lse = attend(1, q, k, -1e-20, -0.0)
    assert (out == 0).all() and lse == np.float32(80.0), (out, lse)
