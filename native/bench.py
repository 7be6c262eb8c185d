"""Native attention benchmark: read bandwidth, our fused attend, and torch's CPU SDPA, one process.

    python -m fastdecode.native.bench --json [--threads T] [--isa avx512] [--cases 64x2048,ragged]
                                             [--rounds R] [--runs N]

Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head dim 128) with bf16 KV, one layer. The
attention rate counts the KV bytes read once (K and V of every cached token). torch runs
``scaled_dot_product_attention`` on the same K/V values with the same thread count, in its most
favourable GQA form (the group's query heads as L=4 queries per KV head); the ragged case pads to
the longest sequence with a boolean mask.

Every case is prepared once; then ``--rounds`` rounds each measure, back to back, the read probe
(our vectorised all-thread read and ``torch.sum`` over the same pre-faulted buffer), one read of each
case's whole pool with the same kernel (``pool_read_gbps``: what the memory that pool landed in
delivers; on some hosts one region of memory reads up to a fifth slower than another,
docs/benchmarks.md "Session 9 H100 runs"), our attention on every case, then torch's on every case.
A machine whose memory bandwidth drifts over seconds thus has the read ceiling and our attention
sampled in the same time windows: the cases' torch calls (several times slower than ours) come after
them, not between the read and them. Each measurement is the best of ``--runs`` timed calls after one
warm-up; each reported figure is the best of its per-round figures (the read ceiling too: best of all
rounds' runs, never lower than one round's). The targets are on ``ratio_to_read``;
``ratio_to_pool_read`` (the attention over its own pool's read) is reported beside it. Our cache is
refilled to its case's lengths before each round, so every round attends over the same lengths.
The per-round figures are under ``"rounds"``. Progress goes to stderr; the last stdout line is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from fastdecode.native import ISA_NAMES
from fastdecode.native.lib import KVPool, ReadBuffer, bf16_dot_cost

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
KV_ELEM_BYTES = 2
CASE_NAMES = ("64x2048", "256x512", "1x32768", "ragged")
NUM_WARMUP = 1


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def case_lengths(name: str, seed: int = 0) -> list[int]:
    """Sequence lengths of a case: '<seqs>x<tokens>' or 'ragged' (64 lengths, log-normal around 2k)."""
    if name == "ragged":
        rng = np.random.default_rng(seed)
        return [int(x) for x in np.clip(rng.lognormal(np.log(2048), 0.6, 64), 128, 8192)]
    num_seqs, num_tokens = (int(x) for x in name.split("x"))
    return [num_tokens] * num_seqs


def _best_time(fn, num_runs: int) -> float:
    for _ in range(NUM_WARMUP):
        fn()
    best = float("inf")
    for _ in range(num_runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)


def measure_read(buf: ReadBuffer, num_runs: int, isa: str | None) -> dict:
    """One round of the read probe: our read and torch.sum over the same bytes, best of ``num_runs`` each."""
    native = buf.measure_gbps(num_runs=num_runs, isa=isa)
    tensor = torch.from_numpy(buf.array)
    torch_gbps = buf.num_bytes / _best_time(lambda: tensor.sum(), num_runs) / 1e9
    return {"read_gbps": max(native, torch_gbps), "read_native_gbps": native, "read_torch_sum_gbps": torch_gbps}


@dataclass(frozen=True)
class PreparedCase:
    """One case's data, alive for all rounds: our pool and torch's padded copies of the same K/V."""
    name: str
    lengths: list[int]
    pool: KVPool
    q: np.ndarray
    k_new: np.ndarray
    v_new: np.ndarray
    k_t: torch.Tensor
    v_t: torch.Tensor
    mask: torch.Tensor | None

    @property
    def kv_bytes(self) -> int:
        """K and V bytes of the cached tokens (the token each call appends, < 1%, is not counted)."""
        return sum(self.lengths) * NUM_KV_HEADS * HEAD_DIM * 2 * KV_ELEM_BYTES

    def refill(self) -> None:
        """Back to the case's lengths: the calls of a round appended a token per call to every sequence."""
        for b, n in enumerate(self.lengths):
            self.pool.free(b)
            self.pool.allocate(b)
            self.pool.append(b, 0, _to_numpy(self.k_t[b, :, :n].transpose(0, 1)),
                             _to_numpy(self.v_t[b, :, :n].transpose(0, 1)))

    def measure_ours(self, num_runs: int) -> dict:
        """One round of our attend: its best time and rate."""
        ids = np.arange(len(self.lengths), dtype=np.int64)
        out = np.empty_like(self.q)
        t_ours = _best_time(lambda: self.pool.attend(0, ids, self.q, self.k_new, self.v_new, out=out), num_runs)
        return {"name": self.name, "attn_gbps": self.kv_bytes / t_ours / 1e9, "t_ours_ms": t_ours * 1e3}

    def measure_pool_read(self) -> float:
        """One read of the case's whole pool (every page, with the pool's threads), in GB/s."""
        return self.pool.measure_read_gbps(num_runs=1)

    def measure_torch(self, num_runs: int) -> float:
        """One round of torch's SDPA on the same values: its best time in milliseconds."""
        q_t = _to_torch(self.q).view(len(self.lengths), NUM_KV_HEADS, NUM_Q_HEADS // NUM_KV_HEADS, HEAD_DIM)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.inference_mode():
            return _best_time(lambda: sdpa(q_t, self.k_t, self.v_t, attn_mask=self.mask), num_runs) * 1e3


def prepare_case(name: str, *, num_threads: int, isa: str | None, num_calls: int, page_size: int,
                 rng) -> PreparedCase:
    """Builds a case's pool (room for ``num_calls`` appended tokens per sequence) and torch tensors."""
    lengths = case_lengths(name)
    batch, max_len = len(lengths), max(lengths)
    pages = sum(-(-(n + num_calls + 1) // page_size) for n in lengths)
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
    q, k_new, v_new = (rng.standard_normal((batch, h, HEAD_DIM), np.float32).astype(ml_dtypes.bfloat16)
                       for h in (NUM_Q_HEADS, NUM_KV_HEADS, NUM_KV_HEADS))
    mask = None
    if min(lengths) != max_len:
        mask = torch.arange(max_len + 1).view(1, 1, 1, -1) <= torch.tensor(lengths).view(-1, 1, 1, 1)
    _log(f"{name}: {batch} sequences, {sum(lengths)} tokens, max {max_len}; pool {pool.capacity_bytes / 2**20:.0f} MiB")
    return PreparedCase(name, lengths, pool, q, k_new, v_new, k_t, v_t, mask)


def combine_rounds(rounds: list[dict], kv_bytes: dict[str, int]) -> dict:
    """The reported figures: each the best of its per-round figures; ratios of those bests."""
    read = {key: max(r[key] for r in rounds) for key in ("read_gbps", "read_native_gbps", "read_torch_sum_gbps")}
    cases = []
    for i, name in enumerate(c["name"] for c in rounds[0]["cases"]):
        per_round = [r["cases"][i] for r in rounds]
        t_ours = min(c["t_ours_ms"] for c in per_round)
        t_torch = min(c["t_torch_ms"] for c in per_round)
        attn_gbps = max(c["attn_gbps"] for c in per_round)
        pool_read_gbps = max(c["pool_read_gbps"] for c in per_round)
        cases.append({"name": name, "attn_gbps": attn_gbps, "t_ours_ms": t_ours, "t_torch_ms": t_torch,
                      "kv_bytes": kv_bytes[name], "ratio_to_torch": t_torch / t_ours,
                      "ratio_to_read": attn_gbps / read["read_gbps"], "pool_read_gbps": pool_read_gbps,
                      "ratio_to_pool_read": attn_gbps / pool_read_gbps,
                      "in_round_ratio_to_read_median": statistics.median(c["ratio_to_read"] for c in per_round)})
    return {**read, "cases": cases}


def run_rounds(cases: list[PreparedCase], buf: ReadBuffer, *, num_rounds: int, num_runs: int,
               isa: str | None) -> list[dict]:
    """``num_rounds`` rounds of: the read probe, a read of every case's pool, our attention on every case,
    torch's on every case; the per-round figures."""
    rounds = []
    for round_index in range(num_rounds):
        if round_index:
            for case in cases:
                case.refill()
        t0 = time.perf_counter()
        read = measure_read(buf, num_runs, isa)
        pool_reads = [case.measure_pool_read() for case in cases]
        figures = [case.measure_ours(num_runs) for case in cases]
        for case, fig, pool_read in zip(cases, figures, pool_reads):
            fig["t_torch_ms"] = case.measure_torch(num_runs)
            fig["ratio_to_read"] = fig["attn_gbps"] / read["read_gbps"]
            fig["pool_read_gbps"] = pool_read
        rounds.append({**read, "seconds": time.perf_counter() - t0, "cases": figures})
        _log(f"round {round_index + 1}/{num_rounds}: read {read['read_native_gbps']:.1f} GB/s "
             f"(torch.sum {read['read_torch_sum_gbps']:.1f}); " +
             ", ".join(f"{f['name']} {f['attn_gbps']:.1f} GB/s (pool {f['pool_read_gbps']:.1f}) "
                       f"x{f['t_torch_ms'] / f['t_ours_ms']:.1f}"
                       for f in figures))
    return rounds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line (always the last)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--isa", default=None, help=f"force an ISA path ({', '.join(ISA_NAMES)})")
    parser.add_argument("--cases", default=",".join(CASE_NAMES))
    parser.add_argument("--rounds", type=int, default=6, help="rounds of read probe + every case (best is kept)")
    parser.add_argument("--runs", type=int, default=4, help="timed runs per measurement and round (best is kept)")
    parser.add_argument("--read-bytes", type=int, default=2 << 30, help="read-probe buffer size")
    parser.add_argument("--page-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        parser.error("--rounds and --runs must be at least 1")
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cases = [prepare_case(name, num_threads=args.threads, isa=args.isa, num_calls=NUM_WARMUP + args.runs,
                          page_size=args.page_size, rng=rng) for name in args.cases.split(",")]
    try:
        with ReadBuffer(args.read_bytes, num_threads=args.threads) as buf:
            read_bytes = buf.num_bytes
            rounds = run_rounds(cases, buf, num_rounds=args.rounds, num_runs=args.runs, isa=args.isa)
    finally:
        for case in cases:
            case.pool.close()
    best = combine_rounds(rounds, {case.name: case.kv_bytes for case in cases})
    isa, prefetch_far = cases[0].pool.isa, cases[0].pool.prefetch_far   # what the pools resolved at creation
    result = {"threads": args.threads, "isa": isa, "bf16_dot_cost": bf16_dot_cost(), "prefetch_far": prefetch_far,
              "read_gbps": best["read_gbps"],
              "read_native_gbps": best["read_native_gbps"], "read_torch_sum_gbps": best["read_torch_sum_gbps"],
              "read_bytes": read_bytes, "torch_version": torch.__version__, "num_rounds": args.rounds,
              "runs_per_round": args.runs, "wall_s": time.perf_counter() - t_start, "cases": best["cases"],
              "rounds": rounds}
    if not args.json:
        for case in best["cases"]:
            _log(f"{case['name']:>8}: {case['attn_gbps']:6.1f} GB/s  ratio_to_read {case['ratio_to_read']:.2f}  "
                 f"ratio_to_torch {case['ratio_to_torch']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
