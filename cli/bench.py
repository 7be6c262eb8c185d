"""``fdctl bench offline``: a fixed batch generated to a fixed length, measured.

Every request has a random prompt of exactly ``--prompt-len`` tokens and
generates exactly ``--output-len`` tokens (EOS ignored, greedy). Prints a
progress bar on stderr and, last on stdout, one JSON object: tokens/s, the
decode step time, time to first token and time per output token percentiles,
per-node busy fractions and the pipeline overlap from the step trace. With
``--out DIR`` it also writes the trace (JSON) and its timeline (PNG; skipped with a
warning line on stderr where matplotlib, the ``[plot]`` extra, is not installed);
with ``--write-gpu-profile FILE`` the Executor's start-up sweep of the dense step (at
batch 1, batch / 2 and batch) as the ``--gpu-profile`` file of ``fdctl plan`` and
``fdctl bench project``.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time

import click

from fastdecode.cli.errors import OneLineCommand, OneLineError, one_line_errors
from fastdecode.cli.bench_plot import PlotUnavailableError, parse_int_list, warn_plot_skipped
from fastdecode.cli.sizes import parse_size
from fastdecode.cli.start_shard import shard_addresses_option


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p90, p99 and the mean of ``values`` ({} for none); a percentile interpolates linearly between the two
    ranks around q * (n - 1), numpy's default and what vLLM reports."""
    import numpy as np

    if not values:
        return {}
    p50, p90, p99 = (float(p) for p in np.percentile(values, (50, 90, 99)))
    return {"p50": p50, "p90": p90, "p99": p99, "mean": statistics.fmean(values)}


async def run_offline(options: dict) -> dict:
    from tqdm import tqdm

    from fastdecode.actors.cluster import Cluster, ClusterConfig
    from fastdecode.actors.executor import ExecutorConfig
    from fastdecode.actors.request import SamplingParams
    from fastdecode.scheduler import SchedulerConfig

    batch, prompt_len, output_len = options["batch"], options["prompt_len"], options["output_len"]
    mode = options["mode"]
    config = ClusterConfig(
        model=options["model"], seed=options["seed"], dtype=options["dtype"], device=options["device"],
        num_shards=0 if mode == "gpu-only" else options["shards"], shard_addresses=tuple(options["shard"]),
        shard_kv_memory_bytes=options["kv_memory"], mode=mode, gpu_kv_memory_bytes=options["gpu_kv_memory"],
        is_cuda_graphs=options["cuda_graphs"], is_compiled=options.get("compile", True),
        expected_mean_context=prompt_len + output_len // 2,
        executor=ExecutorConfig(is_pipelined=options["pipeline"], max_model_len=prompt_len + output_len,
                                max_num_batched_tokens=options.get("max_num_batched_tokens"),
                                scheduler=SchedulerConfig(max_num_seqs=batch, admission="all-at-once"),
                                profile_batches=tuple(sorted({1, max(2, batch // 2), batch}))),
        is_tracing=True, is_shard_loop_threaded=options.get("shard_own_loop", False), is_heap_frozen=True,
    )
    async with await Cluster.start(config) as cluster:
        if options.get("write_gpu_profile"):  # before the run: its steps refine the Executor's model
            write_gpu_profile(cluster, options["model"], options["write_gpu_profile"])
        vocab = cluster.model.config.vocab_size
        rng = random.Random(options["seed"])
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        bar = tqdm(total=batch * output_len, desc="tokens", unit="tok", file=None, mininterval=0.5)
        ttft: list[float] = []
        tpot: list[float] = []

        async def one() -> None:
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
            start = time.perf_counter()
            first = last = None
            count = 0
            async for event in cluster.submit(prompt, params):
                if event.error:
                    raise OneLineError(f"generation failed: {event.error}")
                last = time.perf_counter()
                first = first or last
                count += 1
                bar.update(1)
            ttft.append(first - start)
            if count > 1:
                tpot.append((last - first) / (count - 1))

        start = time.perf_counter()
        try:
            await asyncio.gather(*(one() for _ in range(batch)))
            wall = time.perf_counter() - start
        finally:
            bar.close()  # ends the bar's line, so an error is a line of its own
        trace = cluster.executor.trace
        full_steps = [(e - s) for _, s, e, n in trace.steps if n == batch]
        predicted = [p for (_, _, _, n), p in zip(trace.steps, cluster.executor.predicted_steps_s) if n == batch]
        summary = trace.summary()
        step_s = statistics.median(full_steps) if full_steps else None
        result = {
            "model": options["model"],
            "mode": mode or ("shards" if (options["shards"] or options["shard"]) else "local"),
            "mode_choice": cluster.mode_choice.to_dict() if cluster.mode_choice else None,
            "device": str(cluster.model.device), "dtype": str(cluster.model.dtype).removeprefix("torch."),
            "batch": batch, "prompt_len": prompt_len, "output_len": output_len,
            "max_num_batched_tokens": cluster.executor.prefills.max_num_batched_tokens,
            "num_nodes": len(cluster.executor.nodes), "pipeline": cluster.executor.config.is_pipelined,
            "shard_own_loop": options.get("shard_own_loop", False),
            "cuda_graphs": cluster.executor.decoder.graphs is not None,
            "compiled": cluster.executor.model.is_dense_compiled,
            "tokens_per_s": batch * output_len / wall,
            "decode_tokens_per_s": batch / step_s if step_s else None,
            "step_ms": step_s * 1e3 if step_s else None,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "wall_s": wall,
            "gpu_busy_fraction": summary["gpu_busy_s"] / summary["wall_s"] if summary["wall_s"] else None,
            "node_busy_fraction": {k: v / summary["wall_s"] for k, v in summary["node_busy_s"].items()}
            if summary["wall_s"] else {},
            "overlap": summary["overlap"],
            "layer_breakdown_ms": trace.layer_breakdown(),
            "trace_wall_s": summary["wall_s"], "node_busy_s": summary["node_busy_s"],
            "num_step_tokens": sum(n for *_, n in trace.steps),
            "kv_bytes_per_token": cluster.model.config.kv_bytes_per_token(cluster.model.dtype.itemsize),
        }
        node_stats = [await node.stats() for node in cluster.executor.nodes]
        # a node that attended nothing in the run reports its start-up calibration as its rate: null here
        result["node_attn_gbps"] = {node.node_id: stats.attn_gbps if node.node_id in summary["node_busy_s"] else None
                                    for node, stats in zip(cluster.executor.nodes, node_stats)}
        if predicted and step_s:
            result["predicted_step_ms"] = statistics.median(predicted) * 1e3
            result["prediction_error"] = result["predicted_step_ms"] / result["step_ms"] - 1
        if options["out"]:
            tag = f"{result['mode']}-b{batch}-{'pipe' if options['pipeline'] else 'nopipe'}"
            result["trace"], result["plot"] = write_trace_files(trace, options["out"], tag)
        if options.get("write_gpu_profile"):
            result["gpu_profile"] = options["write_gpu_profile"]
        return result


def write_gpu_profile(cluster, model_name: str, path: str) -> None:
    """The Executor's start-up sweep of the dense step as a GPU profile file (``GpuProfile.to_json_dict``); the
    device's name and memory where it is a CUDA GPU, no memory (not checked by the plan) elsewhere."""
    import torch

    from fastdecode.scheduler import GpuProfile

    model = cluster.model
    is_cuda = model.device.type == "cuda"
    profile = GpuProfile(
        dense_step_s=tuple(cluster.executor.gpu_model.samples),
        device_name=torch.cuda.get_device_name(model.device) if is_cuda else str(model.device),
        memory_bytes=torch.cuda.get_device_properties(model.device).total_memory if is_cuda else None,
        model=model_name, dtype=str(model.dtype).removeprefix("torch."), num_layers=model.config.num_layers,
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        handle.write(json.dumps(profile.to_json_dict(), indent=2) + "\n")


def write_trace_files(trace, out_dir: str, tag: str) -> tuple[str, str | None]:
    """The step trace as JSON, then its timeline PNG: their paths (the PNG's None where it was not drawn). A
    timeline that cannot be drawn (no matplotlib, or no decode step to draw) is a warning line: the benchmark's
    figures and the trace stand without it."""
    from fastdecode.cli.trace_plot import render_timeline

    os.makedirs(out_dir, exist_ok=True)
    trace_path = os.path.join(out_dir, f"trace-{tag}.json")
    trace.write(trace_path)
    timeline_path = os.path.join(out_dir, f"timeline-{tag}.png")
    try:
        render_timeline(trace.to_json(), timeline_path)
    except (PlotUnavailableError, ValueError) as exc:
        warn_plot_skipped(timeline_path, exc)
        return trace_path, None
    return trace_path, timeline_path


@click.group("bench")
def bench() -> None:
    """Benchmarks that print JSON figures."""


@bench.command("offline", cls=OneLineCommand)
@click.option("--model", default="smollm2", show_default=True)
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1))
@click.option("--prompt-len", default=512, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--mode", default=None, type=click.Choice(["gpu-only", "shards", "hybrid"]),
              help="Where KV lives (default: shards if any, else the local torch KV).")
@click.option("--gpu-kv-memory", default=None, help="GPU KV pool for gpu-only/hybrid, e.g. 20GiB.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True)
@click.option("--compile/--no-compile", default=True, show_default=True,
              help="CUDA: the per-layer dense segments through torch.compile.")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(0), help="In-process KVShards.")
@click.option("--shard", multiple=True, callback=shard_addresses_option,
              help="Address of a running shard daemon (repeatable).")
@click.option("--kv-memory", default=None, help="KV memory per in-process shard, e.g. 4GiB.")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--pipeline/--no-pipeline", default=True, show_default=True)
@click.option("--max-num-batched-tokens", default=None, type=click.IntRange(0),
              help="Chunked prefill's per-step token limit (0: off). [default: 2048 on a GPU, 256 on a CPU]")
@click.option("--shard-own-loop", is_flag=True, help="In-process shards on their own thread and event loop.")
@click.option("--out", default=None, help="Folder for the trace JSON and timeline PNG.")
@click.option("--sweep-batch", default=None, help="Comma-separated batch sizes, run in turn (overrides --batch).")
@click.option("--write-gpu-profile", default=None, type=click.Path(dir_okay=False),
              help="Write the Executor's dense-step sweep (batch 1, batch/2, batch) as a --gpu-profile file for "
                   "fdctl plan and bench project.")
def offline(**options) -> None:
    """Generate a fixed batch to a fixed length and report throughput."""
    if options["shard"]:
        options["shards"] = 0
    with one_line_errors():
        try:
            options["kv_memory"] = parse_size(options["kv_memory"]) if options["kv_memory"] else None
            options["gpu_kv_memory"] = parse_size(options["gpu_kv_memory"]) if options["gpu_kv_memory"] else None
            batches = parse_int_list(options["sweep_batch"], "--sweep-batch") if options["sweep_batch"] else None
        except ValueError as exc:
            raise OneLineError(str(exc)) from None
        if batches and options["write_gpu_profile"]:
            raise OneLineError("--write-gpu-profile writes one run's profile: give --batch, not --sweep-batch")
        from fastdecode.actors.gpu_kv import GpuKVMemoryError, check_gpu_kv_memory
        from fastdecode.actors.model.loader import resolve_device

        try:
            if options["gpu_kv_memory"] is not None:  # before any work; the pool checks it again, model loaded
                check_gpu_kv_memory(options["gpu_kv_memory"], resolve_device(options["device"]))
            if batches:
                from fastdecode.cli.bench_sweep import run_sweep

                result = asyncio.run(run_sweep(options, batches))
            else:
                result = asyncio.run(run_offline(options))
        except GpuKVMemoryError as exc:
            raise OneLineError(f"--gpu-kv-memory: {exc}; give a smaller size") from None
        except ValueError as exc:  # a configuration the engine refuses (a length past the context, --shards 0...)
            raise OneLineError(str(exc)) from None
    click.echo(json.dumps(result))


def _add_subcommands() -> None:
    from fastdecode.cli.bench_prefix import prefix_cache_command
    from fastdecode.cli.bench_project import project_command
    from fastdecode.cli.bench_roofline import roofline
    from fastdecode.cli.bench_scaling import scaling_command
    from fastdecode.cli.bench_serve import serve_command

    bench.add_command(roofline)
    bench.add_command(project_command)
    bench.add_command(scaling_command)
    bench.add_command(serve_command)
    bench.add_command(prefix_cache_command)


_add_subcommands()
