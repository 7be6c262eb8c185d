"""Micro-benchmark of one layer's attend fan-out: the Executor's per-message path to its KVShards.

``python -m fastdecode.actors.fanout_bench --json``

One decode layer of a mini-batch of ``--rows`` sequences with Llama-3-8B shapes (q [B,32,128], k, v [B,8,128],
bf16) is split by rows over the shards and sent the way ``DecodeStep`` does it: one ``ShardKVNode.attend`` per
shard, gathered, concatenated.  Set-ups: 1 and 4 in-process shards (``start_embedded_shard``) and 2 shard daemon
processes (``fdctl start-shard`` over tcp loopback); ``inproc4-threaded`` runs each in-process shard's
actor loop on its own thread and event loop (``start_embedded_shard(is_threaded=True)``) instead of the
caller's.  Each shard has one attention thread.

Besides the whole fan-out it times each stage alone, in this process, for one shard's share of the rows:
encode the Attend, decode it, the handler (``KVShard.on_attend``) and the native call inside it, encode and
decode the AttendResult, and the torch<->numpy views.  ``overhead_us`` = fan-out p50 minus the slowest shard's
native time, or all shards' native time spread over this process's CPUs where that is longer (what the
messages cost on top of the attention itself).  ``cpu_us`` is this process's CPU time per fan-out (all its
threads); for in-process shards ``cpu_overhead_us`` = ``cpu_us`` minus the shards' native time: the Python
work per layer, a figure the machine's other load does not move much.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from typing import AsyncIterator, Callable

import numpy as np
import torch

from fastdecode.actors.kv_nodes import ShardKVNode
from fastdecode.actors.kvshard import KVShard, ShardConfig
from fastdecode.transport.event_loop import run_event_loop
from fastdecode.actors.shard_client import ShardClient, start_embedded_shard
from fastdecode.actors.shard_daemons import start_shard_daemon, stop_shard_daemons, wait_ready
from fastdecode.actors.tensor_io import from_numpy, to_numpy
from fastdecode.transport.codec import Codec
from fastdecode.transport.shard_messages import (
    SHARD_CHANNEL,
    Allocate,
    AppendPrompt,
    Attend,
    Configure,
    Free,
    GetStats,
)

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
SHAPE = Configure(num_layers=1, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype="bfloat16")
SETUPS = ("inproc1", "inproc4", "inproc4-threaded", "daemon2")  # in-process: on this loop, or own thread each


RESET_EVERY = 8  # attends append one token each: sequences are re-created (untimed) every few calls


def _kv_memory_bytes(num_rows: int, context: int) -> int:
    """A pool big enough for ``num_rows`` sequences of ``context`` tokens plus the attends between resets."""
    return max(64 << 20, 2 * num_rows * (context + 2 * RESET_EVERY + 64) * 4096)


def _median_us(fn: Callable[[], object], repeats: int, reset: Callable[[], object]) -> float:
    times = []
    for i in range(repeats):
        if i % RESET_EVERY == 0:
            reset()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def _inputs(num_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_rows, NUM_Q_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    k = torch.randn(num_rows, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(num_rows, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    return q, k, v


def _prompt_kv(num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    kv = to_numpy(torch.randn(1, num_tokens, NUM_KV_HEADS, HEAD_DIM).to(torch.bfloat16) * 0.1)
    return kv, kv


def stage_costs(num_rows: int, context: int, repeats: int) -> dict[str, float]:
    """Median microseconds of each stage of one shard's attend message of ``num_rows`` rows, measured alone."""
    codec = Codec(SHARD_CHANNEL)
    q, k, v = _inputs(num_rows, 1)
    seq_ids = np.arange(num_rows, dtype=np.int64)
    shard = KVShard(ShardConfig(kv_memory_bytes=_kv_memory_bytes(num_rows, context), num_threads=1, is_calibrating=False))
    shard.on_configure(SHAPE)
    pk, pv = _prompt_kv(context)

    def reset() -> None:
        if shard.on_get_stats(GetStats()).num_sequences:
            shard.on_free(Free(tuple(range(num_rows))))
        shard.on_allocate(Allocate(tuple(range(num_rows))))
        for seq_id in range(num_rows):
            shard.on_append_prompt(AppendPrompt(seq_id, pk, pv))

    reset()
    qn, kn, vn = to_numpy(q), to_numpy(k), to_numpy(v)
    message = Attend(0, seq_ids, qn, kn, vn)
    frames = [bytes(f) for f in codec.encode(1, message)]
    result = shard.on_attend(message)
    reply_frames = [bytes(f) for f in codec.encode(1, result)]
    pool = shard._pool  # noqa: SLF001 - the bench times the bare native call inside the handler
    assert pool is not None
    costs = {
        "to_numpy_qkv": _median_us(lambda: (to_numpy(q), to_numpy(k), to_numpy(v)), repeats, reset),
        "encode_attend": _median_us(lambda: codec.encode(1, Attend(0, seq_ids, qn, kn, vn)), repeats, reset),
        "decode_attend": _median_us(lambda: codec.decode(frames), repeats, reset),
        "handler": _median_us(lambda: shard.on_attend(message), repeats, reset),
        "native": _median_us(lambda: pool.attend(0, seq_ids, qn, kn, vn), repeats, reset),
        "encode_result": _median_us(lambda: codec.encode(1, result), repeats, reset),
        "decode_result": _median_us(lambda: codec.decode(reply_frames), repeats, reset),
        "from_numpy_o": _median_us(lambda: from_numpy(result.o), repeats, reset),
    }
    shard.close()
    return {name: round(value, 1) for name, value in costs.items()}


@contextlib.asynccontextmanager
async def _shards(setup: str, kv_memory_bytes: int) -> AsyncIterator[list[ShardKVNode]]:
    """The set-up's shards as configured KV nodes; everything is stopped on exit."""
    handles, procs, nodes = [], [], []
    try:
        num_shards = int(setup.split("-")[0].removeprefix("inproc").removeprefix("daemon"))
        if setup.startswith("inproc"):
            for _ in range(num_shards):
                address, handle = await start_embedded_shard(threads=1, kv_memory_bytes=kv_memory_bytes,
                                                              is_calibrating=False,
                                                              is_threaded=setup.endswith("threaded"))
                handles.append(handle)
                nodes.append(ShardKVNode(await ShardClient.connect(address)))
        else:
            for _ in range(num_shards):
                daemon = start_shard_daemon(threads=1, kv_memory=str(kv_memory_bytes),
                                            extra_args=("--no-calibrate", "--log-level", "warning"))
                procs.append(daemon)
                address = await asyncio.to_thread(wait_ready, daemon)
                nodes.append(ShardKVNode(await ShardClient.connect(address)))
        for node in nodes:
            await node.client.configure(num_layers=1, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                                        kv_dtype="bfloat16")
        yield nodes
    finally:
        for node in nodes:
            await node.close()
        for handle in handles:
            await handle.stop()
        stop_shard_daemons(procs, timeout_s=10)


async def fanout(setup: str, num_rows: int, context: int, repeats: int) -> dict:
    """p50/p99 of one layer's fan-out (to_numpy, one attend per shard, gather, cat) for ``setup``."""
    async with _shards(setup, _kv_memory_bytes(num_rows, context)) as nodes:
        num_nodes = len(nodes)
        bounds = np.linspace(0, num_rows, num_nodes + 1).astype(int)
        slices = list(zip(bounds[:-1], bounds[1:]))
        seq_ids = np.arange(num_rows, dtype=np.int64)
        pk, pv = _prompt_kv(context)

        async def reset(is_first: bool) -> None:
            for node, (start, end) in zip(nodes, slices):
                if not is_first:
                    await node.free(list(range(start, end)))
                await node.allocate(list(range(start, end)))
                for seq_id in range(start, end):
                    await node.client.append_prompt(seq_id, pk, pv)

        q, k, v = _inputs(num_rows, 2)

        async def once() -> float:
            t0 = time.perf_counter()
            parts = await asyncio.gather(*(node.attend(0, seq_ids[s:e], q[s:e], k[s:e], v[s:e])
                                           for node, (s, e) in zip(nodes, slices)))
            o = parts[0] if len(parts) == 1 else torch.cat(parts)
            elapsed = time.perf_counter() - t0
            assert o.shape == q.shape
            return elapsed

        times = []
        cpu_s = 0.0
        for i in range(RESET_EVERY + repeats):  # the first RESET_EVERY calls warm up
            if i % RESET_EVERY == 0:
                await reset(is_first=i == 0)
            cpu_start = time.process_time()
            elapsed = await once()
            if i >= RESET_EVERY:
                times.append(elapsed * 1e6)
                cpu_s += time.process_time() - cpu_start
        for node, (start, end) in zip(nodes, slices):  # a daemon drains its sequences before it stops
            await node.free(list(range(start, end)))
    return {"setup": setup, "num_shards": num_nodes, "rows_per_message": int(bounds[1] - bounds[0]),
            "p50_us": round(float(np.percentile(times, 50)), 1), "p99_us": round(float(np.percentile(times, 99)), 1),
            "cpu_us": round(cpu_s / repeats * 1e6, 1)}


async def _bench(args: argparse.Namespace) -> dict:
    results = []
    for context in args.context:
        runs = [await fanout(setup, args.rows, context, args.repeats) for setup in args.setups]
        for run in runs:
            stages = stage_costs(run["rows_per_message"], context, args.repeats)
            num_cpus = len(os.sched_getaffinity(0))
            native_floor = max(stages["native"], run["num_shards"] * stages["native"] / num_cpus)
            run.update(context=context, stages_us=stages, overhead_us=round(run["p50_us"] - native_floor, 1))
            if run["setup"].startswith("inproc"):  # this process did all of it: what beyond the native calls?
                run["cpu_overhead_us"] = round(run["cpu_us"] - run["num_shards"] * stages["native"], 1)
        results.extend(runs)
    load1, _, _ = os.getloadavg()
    return {"benchmark": "one layer's attend fan-out (Llama-3-8B shapes, bf16, 1 attention thread per shard)",
            "rows": args.rows, "repeats": args.repeats, "num_cpus": os.cpu_count(), "load_average_1m": load1,
            "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdecode.actors.fanout_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, nargs="+", default=[16, 512], help="prompt tokens per sequence")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    args = parser.parse_args(argv)
    if args.rows < 4 or args.repeats < 1 or min(args.context) < 1:
        parser.error("--rows must be >= 4, --repeats and --context positive")
    torch.set_num_threads(1)
    result = run_event_loop(_bench(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for run in result["results"]:
        stages = " ".join(f"{name} {value:.0f}" for name, value in run["stages_us"].items())
        print(f"{run['setup']:8s} ctx {run['context']:4d}: fan-out p50 {run['p50_us']:8.1f} us p99 "
              f"{run['p99_us']:8.1f} us, overhead {run['overhead_us']:7.1f} us, cpu {run['cpu_us']:7.1f} us "
              f"(beyond native {run.get('cpu_overhead_us', float('nan')):7.1f}) | per message (us): {stages}")


if __name__ == "__main__":
    main()
