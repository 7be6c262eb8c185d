"""Transport benchmark: one layer's attend exchange with Llama-3-8B shapes, ours vs raw pyzmq.

``python -m fastdecode.transport.bench --json``

For each (tcp loopback | ipc) x (64 | 256 sequences) it sends Attend(q [B,32,128],
k, v [B,8,128] bf16, seq_ids) and gets AttendResult(o [B,32,128] bf16) back from
a server process (our RpcServer) that echoes q as o (transport, not math).  The
same bytes also make a raw pyzmq round trip (DEALER/ROUTER, copy=False, no
envelope, no asyncio) to a second server process; all runs are interleaved repeat
by repeat.

``ours`` is the exchange as a decode step makes it: a ``BlockingLink`` (the dense
thread's own socket, transport/link.py) with our codec, envelope and checks, to our
server; ``overhead_ratio`` = its p50 / raw p50.  ``ours_rpc_client`` is the same
request through the event-loop ``RpcClient`` (what allocate, prompt K/V and
heartbeats use): ``overhead_ratio_rpc_client``.  A third server (raw frames over
zmq.asyncio on both ends) separates what asyncio itself costs:
``overhead_ratio_vs_raw_asyncio`` (RpcClient against raw zmq.asyncio).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import zmq
import zmq.asyncio

from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.event_loop import run_event_loop
from fastdecode.transport.link import BlockingLink
from fastdecode.transport.server import RpcServer
from fastdecode.transport.shard_messages import SHARD_CHANNEL, Attend, AttendResult

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------ servers (child processes)
async def _serve_ours(address: str) -> None:
    codec = Codec(SHARD_CHANNEL)
    server: RpcServer | None = None
    loop = asyncio.get_running_loop()

    def on_request(peer: bytes, request_id: int, message) -> None:
        if isinstance(message, Attend):
            server.reply(peer, request_id, AttendResult(message.q))

    server = RpcServer(address, codec, on_request, name="bench-ours")
    print(f"ready {await server.start()}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    await server.close()


async def _serve_raw_asyncio(address: str) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    print(f"ready {sock.getsockopt(zmq.LAST_ENDPOINT).decode()}", flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    while not stdin_closed.done():
        recv = asyncio.ensure_future(sock.recv_multipart(copy=False))
        await asyncio.wait([recv, stdin_closed], return_when=asyncio.FIRST_COMPLETED)
        if recv.done():
            frames = recv.result()
            await sock.send_multipart([frames[0], frames[2]], copy=False)  # echo q (frame 2) as o
        else:
            recv.cancel()
    sock.close(linger=0)
    ctx.term()


def _serve_raw(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    print(f"ready {sock.getsockopt(zmq.LAST_ENDPOINT).decode()}", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if sock in events:
            frames = sock.recv_multipart(copy=False)
            sock.send_multipart([frames[0], frames[2]], copy=False)  # echo q (frame 2) as o
        elif events:
            break
    sock.close(linger=0)
    ctx.term()


def _start_server(mode: str, address: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "fastdecode.transport.bench", "--serve", mode, address],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        proc.kill()
        raise RuntimeError(f"{mode} bench server did not start: {line}")
    return proc, line[1]


# ------------------------------------------------------------------ client
def _percentile_us(samples: list[float], pct: float) -> float:
    return float(np.percentile(np.asarray(samples), pct) * 1e6)


async def _bench_case(addresses: dict[str, str], num_seqs: int, repeats: int) -> dict:
    rng = np.random.default_rng(num_seqs)
    q = rng.standard_normal((num_seqs, NUM_Q_HEADS, HEAD_DIM)).astype(BF16)
    k = rng.standard_normal((num_seqs, NUM_KV_HEADS, HEAD_DIM)).astype(BF16)
    v = rng.standard_normal((num_seqs, NUM_KV_HEADS, HEAD_DIM)).astype(BF16)
    seq_ids = np.arange(num_seqs, dtype=np.int64)
    message = Attend(0, seq_ids, q, k, v)
    raw_frames = [seq_ids, q.view(np.uint8), k.view(np.uint8), v.view(np.uint8)]

    actx = zmq.asyncio.Context()
    client = RpcClient(addresses["ours"], Codec(SHARD_CHANNEL), ctx=actx, heartbeat_interval_s=5.0, timeout_s=30.0)
    client.start()
    araw = actx.socket(zmq.DEALER)
    araw.connect(addresses["raw_asyncio"])
    sctx = zmq.Context()
    raw = sctx.socket(zmq.DEALER)
    raw.connect(addresses["raw"])
    link = BlockingLink(addresses["ours"], Codec(SHARD_CHANNEL), ctx=sctx, timeout_s=30.0, is_alive=lambda: True)

    async def link_once() -> float:
        start = time.perf_counter()
        reply = link.receive(link.send(message), AttendResult)
        elapsed = time.perf_counter() - start
        assert reply.o.shape == q.shape
        return elapsed

    async def ours_once() -> float:
        start = time.perf_counter()
        reply = await client.request(message)
        elapsed = time.perf_counter() - start
        assert reply.o.shape == q.shape
        return elapsed

    async def raw_asyncio_once() -> float:
        start = time.perf_counter()
        await araw.send_multipart(raw_frames, copy=False)
        frames = await araw.recv_multipart(copy=False)
        elapsed = time.perf_counter() - start
        assert len(frames[0]) == q.nbytes
        return elapsed

    async def raw_once() -> float:
        start = time.perf_counter()
        raw.send_multipart(raw_frames, copy=False)
        frames = raw.recv_multipart(copy=False)
        elapsed = time.perf_counter() - start
        assert len(frames[0]) == q.nbytes
        return elapsed

    runs = {"ours": link_once, "ours_rpc_client": ours_once, "raw_pyzmq": raw_once,
            "raw_pyzmq_asyncio": raw_asyncio_once}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range(max(5, repeats // 10)):  # warm-up: connections, allocator, caches
        for name in order:
            await runs[name]()
    for i in range(repeats):  # interleaved, rotating which goes first
        for name in order[i % len(order):] + order[: i % len(order)]:
            samples[name].append(await runs[name]())
    await client.close()
    link.close()
    araw.close(linger=0)
    raw.close(linger=0)
    sctx.term()
    actx.destroy(linger=0)

    moved = q.nbytes + k.nbytes + v.nbytes + seq_ids.nbytes + q.nbytes  # request + reply payload

    def summary(values: list[float]) -> dict:
        p50 = _percentile_us(values, 50)
        return {"p50_us": round(p50, 1), "p99_us": round(_percentile_us(values, 99), 1),
                "gbps": round(moved / (p50 * 1e-6) / 1e9, 3)}

    result = {name: summary(values) for name, values in samples.items()}
    raw_p50, client_p50 = result["raw_pyzmq"]["p50_us"], result["ours_rpc_client"]["p50_us"]
    return {"num_seqs": num_seqs, "bytes_per_round_trip": moved, "repeats": repeats, **result,
            "overhead_ratio": round(result["ours"]["p50_us"] / raw_p50, 3),
            "overhead_ratio_rpc_client": round(client_p50 / raw_p50, 3),
            "overhead_ratio_vs_raw_asyncio": round(client_p50 / result["raw_pyzmq_asyncio"]["p50_us"], 3)}


async def _bench_all(args: argparse.Namespace) -> dict:
    cases = []
    with tempfile.TemporaryDirectory(prefix="fdbench") as tmp:
        for transport in args.transports:
            addresses = {mode: ("tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp}/{mode}.sock")
                         for mode in ("ours", "raw", "raw_asyncio")}
            servers = {mode: _start_server(mode, address) for mode, address in addresses.items()}
            try:
                for num_seqs in args.num_seqs:
                    bound = {mode: address for mode, (_, address) in servers.items()}
                    case = await _bench_case(bound, num_seqs, args.repeats)
                    cases.append({"transport": transport, **case})
            finally:
                for proc, _ in servers.values():
                    proc.stdin.close()
                    proc.wait(timeout=10)
    return {
        "benchmark": "transport attend exchange (echo server, no attention)",
        "shapes": {"num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "host": {"machine": platform.machine(), "num_cpus": os.cpu_count(), "python": platform.python_version(),
                 "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "cases": cases,
        "max_overhead_ratio": max(c["overhead_ratio"] for c in cases),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdecode.transport.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--transports", nargs="+", choices=["tcp", "ipc"], default=["tcp", "ipc"])
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "ADDRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        mode, address = args.serve
        if mode == "ours":
            run_event_loop(_serve_ours(address))
        elif mode == "raw_asyncio":
            run_event_loop(_serve_raw_asyncio(address))
        else:
            _serve_raw(address)
        return
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    result: dict = {}

    async def run() -> None:
        result.update(await _bench_all(args))

    run_event_loop(run())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for case in result["cases"]:
            print(f"{case['transport']:4s} B={case['num_seqs']:4d}  ours p50 {case['ours']['p50_us']:8.1f} us  "
                  f"RpcClient p50 {case['ours_rpc_client']['p50_us']:8.1f} us  "
                  f"raw p50 {case['raw_pyzmq']['p50_us']:8.1f} us  ratio {case['overhead_ratio']:.3f} "
                  f"(RpcClient {case['overhead_ratio_rpc_client']:.3f}, "
                  f"vs raw asyncio {case['overhead_ratio_vs_raw_asyncio']:.3f})")


if __name__ == "__main__":
    main()
