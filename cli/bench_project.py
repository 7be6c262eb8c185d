"""``fdctl bench project``: the performance model's tokens/s for 1..N CPU hosts against gpu-only.

No model weights are loaded: the scheduler's plan math (``plan_deployment``) runs
once per host count, each host one shard of ``--per-host-gbps`` read bandwidth
(the plan may use fewer if they already keep up with the GPU). The gpu-only row
holds as many sequences as fit in the GPU memory left beside the weights; its step
is the dense step at that batch plus reading their KV at the HBM bandwidth (no row
where a ``--gpu-profile`` has no ``memory_bytes``: the GPU memory is unknown).
Prints one JSON object last on stdout; with ``--out`` also ``projection.png`` (skipped
with a warning line, and ``"plot": null``, where matplotlib is not installed).
"""
from __future__ import annotations

import json
import os
import sys

import click

from fastdecode.cli.bench_plot import line_plots
from fastdecode.cli.errors import OneLineCommand, OneLineError, one_line_errors
from fastdecode.cli.plan import (
    DEFAULT_GPU,
    DTYPE_BYTES,
    FiniteFloatRange,
    gpu_spec,
    resolve_gpu,
    resolve_model_config,
    shape_of,
)


def gpu_only_row(shape, dense_step_s, request, max_batch: int, hbm_bytes_per_s: float) -> dict:
    """Tokens/s with every sequence's KV on the GPU: batch limited by GPU memory, step = dense + KV read. A
    ``max_batch`` below 0 is the plan's for a GPU of unknown memory."""
    if max_batch < 0:
        return {"batch": None, "tokens_per_s": None, "ms_per_token": None,
                "note": "GPU memory unknown: the profile has no memory_bytes"}
    if max_batch < 1:
        return {"batch": 0, "tokens_per_s": 0.0, "ms_per_token": None, "note": "no sequence's KV fits on the GPU"}
    kv_read_s = max_batch * request.mean_context * shape.kv_bytes_per_token / hbm_bytes_per_s
    step_s = dense_step_s(max_batch) + kv_read_s
    return {"batch": max_batch, "tokens_per_s": max_batch / step_s, "ms_per_token": step_s * 1e3,
            "kv_read_ms": kv_read_s * 1e3}


def project(options: dict) -> dict:
    from fastdecode.scheduler import PlanRequest, plan_deployment

    config = resolve_model_config(options["model"])
    shape = shape_of(config, DTYPE_BYTES[options["dtype"]])
    dense_step_s, memory, label = resolve_gpu(options["gpu"], options["gpu_profile"], shape, options["model"])
    hbm = options["hbm_gbps"] * 1e9 if options["hbm_gbps"] else gpu_spec(options["gpu"]).hbm_bytes_per_s
    rows = []
    gpu_only = None
    for hosts in range(1, options["max_hosts"] + 1):
        try:  # a request the plan refuses (PlanRequest's checks), or nothing feasible (a PlanError)
            request = PlanRequest(prompt_len=options["prompt_len"], output_len=options["output_len"],
                                  shard_bytes_per_s=(options["per_host_gbps"] * 1e9,), max_shards=hosts,
                                  shard_overhead_s=options["shard_overhead_us"] * 1e-6,
                                  max_model_len=config.max_position_embeddings)
            result = plan_deployment(shape, dense_step_s, request, memory)
        except ValueError as exc:
            raise OneLineError(str(exc)) from None
        if gpu_only is None:
            gpu_only = gpu_only_row(shape, dense_step_s, request, result.gpu_only_max_batch, hbm)
        rows.append({"hosts": hosts, "hosts_used": result.num_shards, "batch": result.batch_size,
                     "tokens_per_s": result.tokens_per_s, "ms_per_token": result.ms_per_token,
                     "bound": result.bound, "host_memory_gib": result.host_memory_gib,
                     "speedup_vs_gpu_only": result.tokens_per_s / gpu_only["tokens_per_s"]
                     if gpu_only["tokens_per_s"] else None})
        print(f"bench project: {hosts} host(s): {result.tokens_per_s:.0f} tokens/s", file=sys.stderr)
    summary = {"model": options["model"], "gpu": label, "dtype": options["dtype"],
               "per_host_gbps": options["per_host_gbps"], "prompt_len": options["prompt_len"],
               "output_len": options["output_len"], "hbm_gbps": hbm / 1e9, "gpu_only": gpu_only, "rows": rows}
    if options["out"]:
        gpu_only_series = {} if gpu_only["batch"] is None else {
            f"gpu-only (batch {gpu_only['batch']})": [(r["hosts"], gpu_only["tokens_per_s"]) for r in rows]}
        summary["plot"] = line_plots(
            os.path.join(options["out"], "projection.png"),
            f"{options['model']} on {label}: hosts of {options['per_host_gbps']:g} GB/s, prompt "
            f"{options['prompt_len']}, output {options['output_len']}",
            [{"xlabel": "CPU hosts", "ylabel": "tokens/s (model)", "series": {
                "fastdecode (GPU + CPU hosts)": [(r["hosts"], r["tokens_per_s"]) for r in rows],
                **gpu_only_series}}])
    return summary


def format_table(summary: dict) -> str:
    gpu_only = summary["gpu_only"]
    lines = [f"gpu-only: {gpu_only['note']}" if gpu_only["batch"] is None else
             f"gpu-only: batch {gpu_only['batch']}, {gpu_only['tokens_per_s']:,.0f} tokens/s",
             "hosts  used  batch  tokens/s  ms/token  bound   x gpu-only"]
    for r in summary["rows"]:
        speedup = f"{r['speedup_vs_gpu_only']:.2f}" if r["speedup_vs_gpu_only"] else "-"
        lines.append(f"{r['hosts']:>5}  {r['hosts_used']:>4}  {r['batch']:>5}  {r['tokens_per_s']:>8,.0f}  "
                     f"{r['ms_per_token']:>8.1f}  {r['bound']:<6}  {speedup:>9}")
    return "\n".join(lines)


@click.command("project", cls=OneLineCommand)
@click.option("--model", required=True, help="HF folder, smollm2, a preset (llama3-8b...) or random:<preset>.")
@click.option("--per-host-gbps", required=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Measured attention read GB/s of one CPU host.")
@click.option("--max-hosts", default=16, show_default=True, type=click.IntRange(1, 256))
@click.option("--gpu", type=click.Choice(["h100", "h200", "a10"]), default=None, help=f"Analytical GPU (default {DEFAULT_GPU}).")
@click.option("--gpu-profile", type=click.Path(dir_okay=False), default=None, help="Measured dense profile (JSON).")
@click.option("--hbm-gbps", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help=f"GPU memory bandwidth for gpu-only KV reads (default: the --gpu spec's, {DEFAULT_GPU} with a profile).")
@click.option("--shard-overhead-us", type=FiniteFloatRange(min=0), default=100.0, show_default=True,
              help="Per attend call.")
@click.option("--prompt-len", required=True, type=click.IntRange(1))
@click.option("--output-len", required=True, type=click.IntRange(1))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float8"]), default="bfloat16", show_default=True)
@click.option("--out", default=None, help="Folder for projection.png.")
@click.option("--json", "as_json", is_flag=True, help="Only the JSON line (no table on stderr).")
def project_command(**options) -> None:
    """Project tokens/s for 1..N CPU hosts against gpu-only from the performance model."""
    if options["gpu"] and options["gpu_profile"]:
        raise click.UsageError("give --gpu or --gpu-profile, not both")
    with one_line_errors():
        summary = project(options)
    if not options["as_json"]:
        click.echo(format_table(summary), err=True)
    click.echo(json.dumps(summary))
