"""``fdctl bench scaling``: attention throughput of 1, 2, 4... ``fdctl start-shard`` processes on this host.

For each shard count N it starts N shard daemons (tcp loopback, ``--threads T``,
disjoint ``--cpu-list`` when the host has N x T cores), runs the offline benchmark
against them in ``shards`` mode, and stops them. Attention throughput = KV bytes
read / busy time, where KV bytes read = tokens decoded in the traced steps x mean
context (prompt + output / 2) x KV bytes per token (all layers): ``node_gbps`` =
bytes / the nodes' summed busy time, ``attention_gbps`` = that x the nodes that
attended at all (``num_busy_nodes``: at small batches the scheduler may place every
sequence on one shard, and an idle shard reads nothing), ``total_gbps`` = bytes /
traced wall time. The host's read
bandwidth with N x T threads (``fastdecode.native.lib.read_bandwidth_gbps``)
gives efficiency = attention GB/s / read GB/s. One JSON object last on stdout.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

import click

from fastdecode.actors.shard_daemons import ShardDaemonError, shard_daemons
from fastdecode.cli.bench_plot import parse_int_list
from fastdecode.cli.errors import OneLineCommand, OneLineError, one_line_errors


def shard_cpu_lists(count: int, threads: int) -> list[list[int]] | None:
    """Disjoint cores for each daemon when the host has ``count x threads`` of them, else None (unpinned)."""
    cpus = sorted(os.sched_getaffinity(0))
    if count * threads > len(cpus):
        return None
    return [cpus[i * threads:(i + 1) * threads] for i in range(count)]


def attention_figures(result: dict) -> dict:
    """KV GB read per second of node busy time: one node's (bytes over the nodes' summed busy time) and the
    host's (that x the nodes that attended, all busy at once: an idle one adds nothing), and per second of
    traced wall time."""
    mean_context = result["prompt_len"] + result["output_len"] / 2
    kv_bytes = result["num_step_tokens"] * mean_context * result["kv_bytes_per_token"]
    busy_s = [seconds for seconds in result["node_busy_s"].values() if seconds > 0]
    node_gbps = kv_bytes / sum(busy_s) / 1e9 if busy_s else None
    wall = result["trace_wall_s"]
    return {"kv_gb_read": kv_bytes / 1e9, "node_gbps": node_gbps, "num_busy_nodes": len(busy_s),
            "attention_gbps": node_gbps * len(busy_s) if node_gbps else None,
            "total_gbps": kv_bytes / wall / 1e9 if wall else None}


async def run_scaling(options: dict) -> dict:
    from fastdecode.cli.bench import run_offline
    from fastdecode.native.lib import read_bandwidth_gbps

    rows = []
    for count in options["shard_counts"]:
        print(f"bench scaling: {count} shard process(es)", file=sys.stderr)
        cpu_lists = shard_cpu_lists(count, options["threads_per_shard"])
        try:
            with shard_daemons(count, threads=options["threads_per_shard"], kv_memory=options["kv_memory"],
                               cpu_lists=cpu_lists, extra_args=("--log-level", "warning")) as daemons:
                result = await run_offline({**options, "mode": "shards", "shards": 0,
                                            "shard": tuple(d.address for d in daemons),
                                            "kv_memory": None, "gpu_kv_memory": None})
        except ShardDaemonError as exc:
            raise OneLineError(str(exc)) from None
        threads = count * options["threads_per_shard"]
        read_gbps = await asyncio.to_thread(read_bandwidth_gbps, options["read_bytes"], num_threads=threads,
                                            cpu_list=[c for cpus in cpu_lists for c in cpus] if cpu_lists else None)
        figures = attention_figures(result)
        if figures["num_busy_nodes"] < count:
            print(f"bench scaling: only {figures['num_busy_nodes']} of {count} shard(s) attended (the scheduler "
                  f"placed every sequence there); attention_gbps counts those only", file=sys.stderr)
        rows.append({"shards": count, "threads": threads, "is_pinned": cpu_lists is not None,
                     "tokens_per_s": result["tokens_per_s"], "step_ms": result["step_ms"], **figures,
                     "read_gbps": read_gbps,
                     "efficiency": figures["attention_gbps"] / read_gbps if figures["attention_gbps"] else None,
                     "node_busy_fraction": result["node_busy_fraction"]})
    base = rows[0]
    for row in rows:
        row["scaling_vs_first"] = (row["total_gbps"] / base["total_gbps"]
                                   if row["total_gbps"] and base["total_gbps"] else None)
    return {"model": options["model"], "batch": options["batch"], "prompt_len": options["prompt_len"],
            "output_len": options["output_len"], "threads_per_shard": options["threads_per_shard"], "rows": rows}


@click.command("scaling", cls=OneLineCommand)
@click.option("--model", default="smollm2", show_default=True)
@click.option("--threads-per-shard", default=4, show_default=True, type=click.IntRange(1))
@click.option("--shards", "shard_counts", default="1,2,4", show_default=True, help="Shard process counts.")
@click.option("--kv-memory", default="4GiB", show_default=True, help="KV pool of each shard process.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1))
@click.option("--prompt-len", default=512, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=32, show_default=True, type=click.IntRange(1))
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--pipeline/--no-pipeline", default=True, show_default=True)
@click.option("--read-bytes", default=1 << 30, show_default=True, type=click.IntRange(1 << 20),
              help="Buffer for the host read-bandwidth measurement.")
def scaling_command(**options) -> None:
    """Attention throughput of 1..N shard processes against the host's read bandwidth."""
    with one_line_errors():
        try:
            options["shard_counts"] = parse_int_list(options["shard_counts"], "--shards")
        except ValueError as exc:
            raise OneLineError(str(exc)) from None
        options.update(out=None, cuda_graphs=True)
        result = asyncio.run(run_scaling(options))
    click.echo(json.dumps(result))
