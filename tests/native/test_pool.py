"""The KV pool: sizes, sequences, bulk append, read-back rounding, errors, all-or-nothing exhaustion."""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from fastdecode.native import lib
from fastdecode.native.lib import (ISA_ENV_VAR, PREFETCH_FAR_ENV_VAR, STATUS_FULL, KVPool, NativeError,
                                   available_isas, bf16_dot_cost, default_isa, prefetch_far_default)

from native_reference import DTYPES, random_kv

H, D, P, L = 2, 64, 32, 3
PAGE_BYTES_BF16 = 2 * H * D * P * 2


def make_pool(num_pages=8, kv_dtype="bfloat16", **kwargs):
    return KVPool(num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype=kv_dtype,
                  capacity_bytes=num_pages * 2 * H * D * P * np.dtype(DTYPES[kv_dtype]).itemsize,
                  page_size=P, num_threads=2, **kwargs)


def test_sizes_and_accounting(rng):
    with make_pool(num_pages=10) as pool:
        assert pool.bytes_per_token == 2 * H * D * 2          # K and V, all KV heads, one layer
        assert pool.capacity_bytes == 10 * PAGE_BYTES_BF16
        assert (pool.num_total_pages, pool.num_free_pages, pool.used_bytes) == (10, 10, 0)
        assert pool.page_size == P and pool.kv_dtype == "bfloat16" and pool.num_threads == 2
        pool.allocate(7)
        assert pool.num_sequences == 1 and pool.used_bytes == 0
        k, v, _, _ = random_kv(rng, (L, 33, H, D), "bfloat16")
        pool.append(7, None, k, v)                              # 33 tokens: 2 pages on each of 3 layers
        assert [pool.seq_len(7, layer) for layer in range(L)] == [33] * L
        assert pool.num_free_pages == 4 and pool.used_bytes == 6 * PAGE_BYTES_BF16
        assert pool.can_allocate_tokens(32) and not pool.can_allocate_tokens(33)
        pool.free(7)
        assert pool.num_free_pages == 10 and pool.num_sequences == 0


@pytest.mark.parametrize("kv_dtype", list(DTYPES))
@pytest.mark.parametrize("src_dtype", list(DTYPES))
def test_read_back_is_the_rounded_input(rng, kv_dtype, src_dtype):
    with make_pool(kv_dtype=kv_dtype) as pool:
        pool.allocate(1)
        k, v, k_ref, v_ref = random_kv(rng, (40, H, D), kv_dtype, src_dtype)
        pool.append(1, 2, k[:17], v[:17])                        # bulk, then one more bulk across a page
        pool.append(1, 2, k[17:], v[17:])
        k_out, v_out = pool.read(1, 2)
        assert k_out.dtype == np.float32 and k_out.shape == (40, H, D)
        np.testing.assert_array_equal(k_out, k_ref.astype(np.float32))
        np.testing.assert_array_equal(v_out, v_ref.astype(np.float32))
        assert pool.read(1, 0)[0].shape == (0, H, D)


SPECIAL = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, np.inf, -np.inf, 6.1e-5,
                    5.96e-8, 2.98e-8, 2.99e-8, 1e-9, 3.0e-5, 1.00048828125, 1.00146484375, 3.3895e38,
                    1.0 + 2**-8, 1.0 + 3 * 2**-9, -1.2e-40], dtype=np.float32)


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_conversion_rounds_to_nearest_even_like_numpy(kv_dtype):
    values = np.resize(SPECIAL, (1, H, D)).astype(np.float32)
    with make_pool(kv_dtype=kv_dtype) as pool:
        pool.allocate(1)
        pool.append(1, 0, values, -values)
        k_out, v_out = pool.read(1, 0)
    with np.errstate(over="ignore"):
        expected = values.astype(DTYPES[kv_dtype]).astype(np.float32)
    np.testing.assert_array_equal(k_out, expected)
    np.testing.assert_array_equal(v_out, -expected)


def test_append_is_all_or_nothing_when_full(rng):
    with make_pool(num_pages=7) as pool:
        pool.allocate(1)
        k, v, _, _ = random_kv(rng, (L, 40, H, D), "bfloat16")
        pool.append(1, None, k, v)                              # 6 pages
        before = pool.read(1, 0)
        with pytest.raises(NativeError) as info:
            pool.append(1, None, k[:, :30].copy(), v[:, :30].copy())   # needs 3 more pages, 1 free
        assert info.value.status == STATUS_FULL
        assert [pool.seq_len(1, layer) for layer in range(L)] == [40] * L
        assert pool.num_free_pages == 1
        np.testing.assert_array_equal(pool.read(1, 0)[0], before[0])
        pool.append(1, 1, k[1, :25], v[1, :25])                  # 65 tokens: takes the free page
        assert pool.seq_len(1, 1) == 65 and pool.num_free_pages == 0


def test_attend_exhaustion_appends_nothing_for_any_sequence(rng):
    with make_pool(num_pages=4) as pool:
        k, v, _, _ = random_kv(rng, (32, H, D), "bfloat16")
        for seq_id, n in ((1, 31), (2, 32), (3, 32)):            # 3 pages used, 1 free
            pool.allocate(seq_id)
            pool.append(seq_id, 0, k[:n], v[:n])
        snapshot = {s: pool.read(s, 0) for s in (1, 2, 3)}
        q = rng.standard_normal((3, 2 * H, D), dtype=np.float32)
        kn = rng.standard_normal((3, H, D), dtype=np.float32)
        with pytest.raises(NativeError, match="full") as info:   # seqs 2 and 3 both need a page
            pool.attend(0, np.array([1, 2, 3]), q, kn, kn)
        assert info.value.status == STATUS_FULL
        assert [pool.seq_len(s, 0) for s in (1, 2, 3)] == [31, 32, 32] and pool.num_free_pages == 1
        for s in (1, 2, 3):
            np.testing.assert_array_equal(pool.read(s, 0)[1], snapshot[s][1])
        pool.attend(0, np.array([1, 2]), q[:2], kn[:2], kn[:2])   # one new page: fits
        assert [pool.seq_len(s, 0) for s in (1, 2, 3)] == [32, 33, 32] and pool.num_free_pages == 0


def test_sequence_errors():
    with make_pool() as pool:
        pool.allocate(5)
        with pytest.raises(NativeError, match="already allocated"):
            pool.allocate(5)
        with pytest.raises(NativeError, match="unknown sequence"):
            pool.free(6)
        with pytest.raises(NativeError, match="unknown sequence"):
            pool.seq_len(6, 0)
        with pytest.raises(NativeError, match="layer"):
            pool.seq_len(5, L)
        q = np.zeros((2, H, D), np.float32)
        kn = np.zeros((2, H, D), np.float32)
        with pytest.raises(NativeError, match="unknown sequence"):
            pool.attend(0, np.array([5, 6]), q, kn, kn)
        with pytest.raises(NativeError, match="twice"):
            pool.attend(0, np.array([5, 5]), q, kn, kn)
        assert pool.seq_len(5, 0) == 0 and pool.num_free_pages == pool.num_total_pages


def test_bad_arrays_are_rejected_before_the_call():
    with make_pool() as pool:
        pool.allocate(1)
        good = np.zeros((1, H, D), np.float32)
        q = np.zeros((1, 2 * H, D), np.float32)
        with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
            pool.attend(0, [1], q.astype(np.float64), good, good)
        with pytest.raises(ValueError, match="shape"):
            pool.attend(0, [1], q, np.zeros((1, H, D + 1), np.float32), good)
        with pytest.raises(ValueError, match="contiguous"):
            pool.attend(0, [1], np.zeros((1, 2 * H, 2 * D), np.float32)[:, :, ::2], good, good)
        with pytest.raises(ValueError, match="share a dtype"):
            pool.attend(0, [1], q, good, good.astype(np.float16))
        with pytest.raises(ValueError, match="lse"):
            pool.attend(0, [1], q, good, good, lse=np.zeros((1, 2 * H), np.float64))
        with pytest.raises(NativeError, match="multiple of num_kv_heads"):
            pool.attend(0, [1], np.zeros((1, 3, D), np.float32), good, good)
        with pytest.raises(ValueError, match="numpy array"):
            pool.append(1, 0, [[0.0]], good)
        with pytest.raises(ValueError, match="4-d"):
            pool.append(1, None, good, good)                     # all layers needs [L, T, H, D]
        assert pool.seq_len(1, 0) == 0
        pool.attend(0, [1], q, good, good)                       # still usable
        assert pool.seq_len(1, 0) == 1


def test_bad_config_is_an_error_not_a_crash():
    for kwargs in ({"head_dim": 60}, {"page_size": 24}, {"capacity_bytes": 10}, {"num_kv_heads": 0}):
        args = {"num_layers": 1, "num_kv_heads": 2, "head_dim": 64, "kv_dtype": "float32",
                "capacity_bytes": 1 << 20, "page_size": 32, **kwargs}
        with pytest.raises((NativeError, ValueError)):
            KVPool(**args)
    with pytest.raises(ValueError, match="kv_dtype"):
        KVPool(num_layers=1, num_kv_heads=1, head_dim=64, kv_dtype="int8", capacity_bytes=1 << 20)


def test_close_is_idempotent_and_later_calls_fail():
    pool = make_pool()
    pool.close()
    pool.close()
    with pytest.raises(NativeError, match="closed"):
        pool.allocate(1)


def test_isa_choice_by_option_and_environment(monkeypatch):
    assert available_isas()[0] == "generic"
    best = available_isas()[-1]
    if best == "avx512_bf16" and bf16_dot_cost() > 2:             # a slow vdpbf16ps: float32 FMAs instead
        best = "avx512"
    with make_pool() as pool:
        assert pool.isa == best == default_isa()                 # best by default
    for isa in available_isas():
        with make_pool(isa=isa) as pool:
            assert pool.isa == isa
    monkeypatch.setenv(ISA_ENV_VAR, "generic")
    with make_pool() as pool:
        assert pool.isa == "generic"
    monkeypatch.setenv(ISA_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="unknown ISA"):
        make_pool()


def test_prefetch_far_by_cpu_option_and_environment(monkeypatch):
    with make_pool() as pool:
        assert pool.prefetch_far == prefetch_far_default()
    for far in (False, True):
        with make_pool(prefetch_far=far) as pool:
            assert pool.prefetch_far is far
    monkeypatch.setenv(PREFETCH_FAR_ENV_VAR, "1")
    with make_pool() as pool:
        assert pool.prefetch_far
    with make_pool(prefetch_far=False) as pool:                 # the option wins over the environment
        assert not pool.prefetch_far
    monkeypatch.setenv(PREFETCH_FAR_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        make_pool()


def test_bf16_dot_cost_is_measured_once_where_the_path_exists():
    cost = bf16_dot_cost()
    if "avx512_bf16" in available_isas():
        assert 0.05 < cost < 100 and bf16_dot_cost() == cost     # a ratio of two timings, kept for the process
    else:
        assert cost == 0.0


def test_cpu_list_pins_workers_and_restores_the_caller(rng):
    cpus = sorted(os.sched_getaffinity(0))
    with make_pool(cpu_list=cpus[:1]) as pool:
        assert pool.num_threads == 2                             # explicit count wins over the list length
        pool.allocate(1)
        k, v, _, _ = random_kv(rng, (3, H, D), "bfloat16")
        pool.append(1, 0, k, v)
        pool.attend(0, [1], rng.standard_normal((1, H, D), dtype=np.float32), k[:1].astype(np.float32),
                    v[:1].astype(np.float32))
    assert sorted(os.sched_getaffinity(0)) == cpus
    with KVPool(num_layers=1, num_kv_heads=1, head_dim=16, kv_dtype="float32", capacity_bytes=1 << 16,
                page_size=16, cpu_list=cpus) as pool:
        assert pool.num_threads == len(cpus)


def test_bfloat16_numpy_inputs_are_accepted(rng):
    with make_pool() as pool:
        pool.allocate(1)
        k = rng.standard_normal((2, H, D), dtype=np.float32).astype(ml_dtypes.bfloat16)
        pool.append(1, 0, k, k)
        np.testing.assert_array_equal(pool.read(1, 0)[0], k.astype(np.float32))


def test_reading_the_pools_memory_reports_a_rate_and_leaves_the_cache_unchanged(rng):
    with make_pool(num_pages=64) as pool:
        k, v, _, _ = random_kv(rng, (L, 40, H, D), "bfloat16")
        pool.allocate(7)
        pool.append(7, None, k, v)
        before = pool.read(7, 1)
        assert pool.measure_read_gbps(num_runs=2) > 0
        after = pool.read(7, 1)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        with pytest.raises(ValueError, match="num_runs"):
            pool.measure_read_gbps(num_runs=0)
    with pytest.raises(NativeError, match="closed"):
        pool.measure_read_gbps()


def test_arguments_c_would_misread_are_refused_before_they_reach_it(rng):
    """A found read-only review: append at layer -1 with one layer's k, v (the library reads -1 as every layer, so
    it read L times the buffer); ints ctypes wraps (2**32 is layer 0); chunks whose token count overflowed int;
    a token count so large that the page arithmetic wrapped and said it fits."""
    with make_pool(num_pages=8) as pool:
        pool.allocate(1)
        k, v, _, _ = random_kv(rng, (5, H, D), "bfloat16")
        for layer in (-1, -2, L):
            with pytest.raises(ValueError, match="outside"):
                pool.append(1, layer, k, v)
        status = lib._LIB.fd_append(pool._live_handle(), 1, -2, 5, k.ctypes.data, v.ctypes.data,
                                    lib._dtype_code("k", k))
        assert status != 0 and "out of range" in lib._LIB.fd_last_error().decode()  # the library refuses too
        assert pool.seq_len(1, 0) == 0 and pool.num_free_pages == 8  # nothing written
        q = np.zeros((1, H, D), np.float32)
        with pytest.raises(ValueError, match="32-bit"):
            pool.attend(1 << 32, np.array([1]), q, q, q)
        with pytest.raises(ValueError, match="32-bit"):
            pool.read(1, 1 << 32)
        assert not pool.can_allocate_tokens((1 << 63) - 1)
    with pytest.raises(NativeError, match="chunk_pages"):
        make_pool(chunk_tokens=P << 20)  # 2**25 tokens a chunk: chunk_pages fits int32, chunk_pages * P did not
    with pytest.raises(ValueError, match="32-bit"):
        make_pool(chunk_tokens=P << 32)
    with pytest.raises(ValueError, match="32-bit"):
        KVPool(num_layers=(1 << 32) + 1, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16", capacity_bytes=1 << 20)


def test_closing_a_read_buffer_waits_for_its_measurement():
    """close() unmapped the buffer while another thread's measurement read it (a crash); it now waits."""
    import threading

    buf = lib.ReadBuffer(256 << 20, num_threads=2)
    results = []
    measuring = threading.Thread(target=lambda: results.append(buf.measure_gbps(num_runs=20)))
    measuring.start()
    while not buf._lock.locked() and measuring.is_alive():
        pass
    buf.close()
    measuring.join()
    assert len(results) == 1 and results[0] > 0 and buf.array is None
    with pytest.raises(NativeError, match="closed"):
        buf.measure_gbps()
