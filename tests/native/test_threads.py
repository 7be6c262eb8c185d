"""Threading: the split is fixed by the data (bitwise-equal results for any thread count), and the
GIL is released during a native call."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fastdecode.native.lib import KVPool

from native_reference import DTYPES, ISAS, random_kv

H, G, D = 4, 4, 128
LENGTHS = [1, 700, 3000, 9000]       # several chunks of 512 tokens for most sequences


def attend_with_threads(num_threads: int, isa: str, kv_dtype: str = "bfloat16", q_dtype: str = "float32",
                        prefetch_far: bool | None = None):
    rng = np.random.default_rng(7)
    with KVPool(num_layers=1, num_kv_heads=H, head_dim=D, kv_dtype=kv_dtype, capacity_bytes=64 << 20,
                num_threads=num_threads, isa=isa, prefetch_far=prefetch_far) as pool:
        for seq_id, n in enumerate(LENGTHS):
            k, v, _, _ = random_kv(rng, (n, H, D), kv_dtype)
            pool.allocate(seq_id)
            pool.append(seq_id, 0, k, v)
        q = rng.standard_normal((len(LENGTHS), H * G, D), dtype=np.float32).astype(DTYPES[q_dtype])
        kn = rng.standard_normal((len(LENGTHS), H, D), dtype=np.float32).astype(DTYPES[q_dtype])
        outs = []
        for _ in range(2):                      # two steps: the second crosses no page, same split
            lse = np.empty((len(LENGTHS), H * G), np.float32)
            outs.append((pool.attend(0, np.arange(len(LENGTHS)), q, kn, kn, lse=lse), lse))
    return outs


@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])   # bf16 q takes the bf16 dot path where there is one
@pytest.mark.parametrize("isa", ISAS)
def test_one_and_many_threads_give_bitwise_equal_results(isa, q_dtype):
    single = attend_with_threads(1, isa, q_dtype=q_dtype)
    for num_threads in (2, 3, 5):
        many = attend_with_threads(num_threads, isa, q_dtype=q_dtype)
        for (o1, l1), (on, ln) in zip(single, many):
            assert o1.tobytes() == on.tobytes()
            assert l1.tobytes() == ln.tobytes()


@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", ISAS)
def test_the_second_prefetch_level_changes_no_bit(isa, q_dtype):
    near, both = (attend_with_threads(3, isa, q_dtype=q_dtype, prefetch_far=far) for far in (False, True))
    for (o1, l1), (o2, l2) in zip(near, both):
        assert o1.tobytes() == o2.tobytes()
        assert l1.tobytes() == l2.tobytes()


def test_another_python_thread_runs_during_a_long_call():
    rng = np.random.default_rng(3)
    batch, n = 4, 16384
    with KVPool(num_layers=1, num_kv_heads=8, head_dim=128, kv_dtype="bfloat16",
                capacity_bytes=batch * (n + 64) * 8 * 128 * 4, num_threads=1, isa="generic") as pool:
        k, v, _, _ = random_kv(rng, (n, 8, 128), "bfloat16", "bfloat16")
        for seq_id in range(batch):
            pool.allocate(seq_id)
            pool.append(seq_id, 0, k, v)
        q = rng.standard_normal((batch, 32, 128), dtype=np.float32)
        kn = q[:, :8].copy()
        started, call_times = threading.Event(), []

        def worker():
            started.set()
            for _ in range(4):
                t0 = time.perf_counter()
                pool.attend(0, np.arange(batch), q, kn, kn)
                call_times.append(time.perf_counter() - t0)

        thread = threading.Thread(target=worker)
        thread.start()
        started.wait()
        ticks, max_gap, last = 0, 0.0, time.perf_counter()
        while thread.is_alive():
            now = time.perf_counter()
            max_gap, last, ticks = max(max_gap, now - last), now, ticks + 1
        thread.join()
    # Were the GIL held through a call, this loop would stall for a whole call at least once.
    assert min(call_times) > 0.02
    assert max_gap < 0.5 * min(call_times), (max_gap, call_times)
    assert ticks > 1000


def test_a_cpu_outside_the_process_set_is_refused_when_the_pool_is_made():
    """A CPU this process may not run on is refused when a pool or buffer is made (a non-zero status with
    fd_last_error's text), not a pool whose threads silently run wherever the OS puts them."""
    import os

    from fastdecode.native.lib import NativeError, ReadBuffer

    allowed = os.sched_getaffinity(0)
    outside = next(cpu for cpu in range(1023, -1, -1) if cpu not in allowed)
    with pytest.raises(NativeError, match=f"cpu {outside} is not in this process's CPU set"):
        KVPool(num_layers=1, num_kv_heads=1, head_dim=16, kv_dtype="float32", capacity_bytes=1 << 16,
               page_size=16, num_threads=2, cpu_list=[min(allowed), outside])
    with pytest.raises(NativeError, match="not in this process's CPU set"):
        ReadBuffer(1 << 16, num_threads=1, cpu_list=[outside])
    assert os.sched_getaffinity(0) == allowed          # nothing was left pinned
    with KVPool(num_layers=1, num_kv_heads=1, head_dim=16, kv_dtype="float32", capacity_bytes=1 << 16,
                page_size=16, num_threads=1, cpu_list=[min(allowed)]) as pool:
        assert pool.num_threads == 1
