"""Native attention benchmark: read bandwidth, our fused attend, and torch's CPU SDPA, one process.

    python -m fastdecode.native.bench --json [--threads T] [--isa avx512] [--cases 64x2048,ragged]

Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head dim 128) with bf16 KV, one layer. The
attention rate counts the KV bytes read once (K and V of every cached token). torch runs
``scaled_dot_product_attention`` on the same K/V values with the same thread count, in its most
favourable GQA form (the group's query heads as L=4 queries per KV head); the ragged case pads to
the longest sequence with a boolean mask. Times are the best of ``--runs`` after a warm-up, for
every measurement alike. Progress goes to stderr; the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_dtypes
import numpy as np
import torch

from fastdecode.native.lib import KVPool, ReadBuffer

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
KV_ELEM_BYTES = 2
CASE_NAMES = ("64x2048", "256x512", "1x32768", "ragged")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def case_lengths(name: str, seed: int = 0) -> list[int]:
    """Sequence lengths of a case: '<seqs>x<tokens>' or 'ragged' (64 lengths, log-normal around 2k)."""
    if name == "ragged":
        rng = np.random.default_rng(seed)
        return [int(x) for x in np.clip(rng.lognormal(np.log(2048), 0.6, 64), 128, 8192)]
    num_seqs, num_tokens = (int(x) for x in name.split("x"))
    return [num_tokens] * num_seqs


def _best_time(fn, num_runs: int, num_warmup: int = 2) -> float:
    for _ in range(num_warmup):
        fn()
    best = float("inf")
    for _ in range(num_runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)


def measure_read(num_bytes: int, num_threads: int, num_runs: int, isa: str | None) -> dict:
    with ReadBuffer(num_bytes, num_threads=num_threads) as buf:
        native = buf.measure_gbps(num_runs=num_runs, isa=isa)
        tensor = torch.from_numpy(buf.array)
        t_sum = _best_time(lambda: tensor.sum(), num_runs)
        del tensor
        torch_gbps = buf.num_bytes / t_sum / 1e9
    return {"read_gbps": max(native, torch_gbps), "read_native_gbps": native, "read_torch_sum_gbps": torch_gbps,
            "read_bytes": buf.num_bytes}


def run_case(name: str, *, num_threads: int, isa: str | None, num_runs: int, page_size: int, rng) -> dict:
    lengths = case_lengths(name)
    batch, max_len = len(lengths), max(lengths)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    extra = num_runs + 4          # tokens each sequence gains during warm-up and timed runs
    pages = sum(-(-(n + extra) // page_size) for n in lengths)
    page_bytes = 2 * NUM_KV_HEADS * HEAD_DIM * page_size * KV_ELEM_BYTES
    pool = KVPool(num_layers=1, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype="bfloat16",
                  capacity_bytes=pages * page_bytes, page_size=page_size, num_threads=num_threads, isa=isa)
    k_t = torch.zeros(batch, NUM_KV_HEADS, max_len + 1, HEAD_DIM, dtype=torch.bfloat16)
    v_t = torch.zeros_like(k_t)
    for b, n in enumerate(lengths):
        k = rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM), np.float32).astype(ml_dtypes.bfloat16)
        v = rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM), np.float32).astype(ml_dtypes.bfloat16)
        pool.allocate(b)
        pool.append(b, 0, k, v)
        k_t[b, :, :n] = _to_torch(k).transpose(0, 1)
        v_t[b, :, :n] = _to_torch(v).transpose(0, 1)
    ids = np.arange(batch, dtype=np.int64)
    q = rng.standard_normal((batch, NUM_Q_HEADS, HEAD_DIM), np.float32).astype(ml_dtypes.bfloat16)
    k_new = rng.standard_normal((batch, NUM_KV_HEADS, HEAD_DIM), np.float32).astype(ml_dtypes.bfloat16)
    v_new = rng.standard_normal((batch, NUM_KV_HEADS, HEAD_DIM), np.float32).astype(ml_dtypes.bfloat16)
    out = np.empty_like(q)
    _log(f"{name}: {batch} sequences, {sum(lengths)} tokens, max {max_len}; pool {pool.capacity_bytes / 2**20:.0f} MiB")
    t_ours = _best_time(lambda: pool.attend(0, ids, q, k_new, v_new, out=out), num_runs)
    kv_bytes = sum(lengths) * NUM_KV_HEADS * HEAD_DIM * 2 * KV_ELEM_BYTES   # lengths grew by < 1%: not counted
    pool.close()

    q_t = _to_torch(q).view(batch, NUM_KV_HEADS, group, HEAD_DIM)
    is_uniform = min(lengths) == max_len
    mask = None
    if not is_uniform:
        mask = torch.arange(max_len + 1).view(1, 1, 1, -1) <= torch.tensor(lengths).view(-1, 1, 1, 1)
    with torch.inference_mode():
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t_torch = _best_time(lambda: sdpa(q_t, k_t, v_t, attn_mask=mask), num_runs)
    attn_gbps = kv_bytes / t_ours / 1e9
    _log(f"{name}: ours {t_ours * 1e3:.2f} ms ({attn_gbps:.1f} GB/s), torch sdpa {t_torch * 1e3:.2f} ms")
    return {"name": name, "attn_gbps": attn_gbps, "t_ours_ms": t_ours * 1e3, "t_torch_ms": t_torch * 1e3,
            "kv_bytes": kv_bytes, "ratio_to_torch": t_torch / t_ours}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line (always the last)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--isa", default=None, help="force an ISA path (generic, avx2, avx512, avx512_bf16)")
    parser.add_argument("--cases", default=",".join(CASE_NAMES))
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement (best is kept)")
    parser.add_argument("--read-bytes", type=int, default=2 << 30, help="read-probe buffer size")
    parser.add_argument("--page-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    read = measure_read(args.read_bytes, args.threads, args.runs, args.isa)
    _log(f"read: native {read['read_native_gbps']:.1f} GB/s, torch.sum {read['read_torch_sum_gbps']:.1f} GB/s")
    cases = []
    for name in args.cases.split(","):
        case = run_case(name, num_threads=args.threads, isa=args.isa, num_runs=args.runs,
                        page_size=args.page_size, rng=rng)
        case["ratio_to_read"] = case["attn_gbps"] / read["read_gbps"]
        cases.append(case)
    isa = KVPool(num_layers=1, num_kv_heads=1, head_dim=16, kv_dtype="float32", capacity_bytes=1 << 16,
                 page_size=16, num_threads=1, isa=args.isa).isa
    result = {"threads": args.threads, "isa": isa, **read, "torch_version": torch.__version__, "cases": cases}
    if not args.json:
        for case in cases:
            _log(f"{case['name']:>8}: {case['attn_gbps']:6.1f} GB/s  ratio_to_read {case['ratio_to_read']:.2f}  "
                 f"ratio_to_torch {case['ratio_to_torch']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
