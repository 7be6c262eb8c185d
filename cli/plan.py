"""``fdctl plan``: batch size, shard count, tokens/s, latency and host memory for a model.

Reads the model's config only (no weights).  The math lives in
``fastdecode.scheduler.plan``; this module turns options and a ``ModelConfig``
into its plain inputs and prints the result.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import click

from fastdecode.cli.errors import OneLineCommand, OneLineError
from fastdecode.scheduler.gpu_profile import GPU_SPECS, GpuProfile, GpuSpec
from fastdecode.scheduler.model_shape import ModelShape
from fastdecode.scheduler.plan import PlanError, PlanRequest, PlanResult, plan_deployment

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float8": 1}
DEFAULT_GPU = "h100"  # the analytical GPU where no --gpu is given (plan, bench project)


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses inf and nan, which it lets through (nan compares false to any bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


def shape_of(config, dtype_bytes: int) -> ModelShape:
    """A ``ModelShape`` from a ``fastdecode.actors.model.config.ModelConfig``."""
    return ModelShape(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
        num_params=config.num_params,
        weight_bytes=config.weight_bytes(dtype_bytes),
        kv_bytes_per_token=config.kv_bytes_per_token(dtype_bytes),
        dtype_bytes=dtype_bytes,
    )


def resolve_model_config(name: str):
    """A HF folder, ``smollm2``, ``random:<preset>`` or a bare preset name (``llama3-70b``)."""
    from fastdecode.actors.model import resolve_config
    from fastdecode.actors.model.errors import ModelError
    from fastdecode.actors.model.presets import PRESETS, preset_config

    if name in PRESETS and not Path(name).is_dir():
        return preset_config(name)
    try:
        return resolve_config(name)
    except ModelError as exc:
        raise OneLineError(f"{exc} (presets: {', '.join(PRESETS)})") from None


def load_profile(path: str) -> GpuProfile:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OneLineError(f"cannot read GPU profile {path}: {exc}") from None
    try:
        return GpuProfile.from_json_dict(data)
    except ValueError as exc:
        raise OneLineError(f"bad GPU profile {path}: {exc}") from None


def gpu_spec(gpu: str | None) -> GpuSpec:
    """The built-in spec of ``--gpu``, ``DEFAULT_GPU``'s where none is given."""
    return GPU_SPECS[gpu or DEFAULT_GPU]


def resolve_gpu(gpu: str | None, gpu_profile: str | None, shape: ModelShape,
                model_name: str) -> tuple[Callable[[float], float], int | None, str]:
    """(seconds of one dense pass of a batch, the GPU's memory in bytes or None where unknown, a label) from
    ``--gpu`` (h100 when neither is given) or ``--gpu-profile``; a profile measured on a model of another depth is
    refused."""
    if gpu_profile:
        profile = load_profile(gpu_profile)
        if profile.num_layers is not None and profile.num_layers != shape.num_layers:
            raise OneLineError(
                f"the profile was measured on a {profile.num_layers}-layer model, {model_name} has {shape.num_layers}"
            )
        return profile.perf_model().predict, profile.memory_bytes, profile.device_name or gpu_profile
    spec = gpu_spec(gpu)
    return (lambda b: spec.dense_step_s(shape, b)), spec.memory_bytes, spec.name


def format_text(model: str, gpu_label: str, request: PlanRequest, result: PlanResult) -> str:
    shards = ", ".join(f"{g:g}" for g in sorted(set(result.shard_gbps), reverse=True))
    lines = [
        f"{model} on {gpu_label}: prompt {request.prompt_len} + output {request.output_len} tokens",
        f"  batch size    {result.batch_size} (two mini-batches of {result.batch_size // 2})",
        f"  shards        {result.num_shards} ({shards} GB/s)",
        f"  throughput    {result.tokens_per_s:,.0f} tokens/s",
        f"  latency       {result.ms_per_token:.1f} ms per token",
        f"  host memory   {result.host_memory_gib:.1f} GiB of KV-cache",
        "why:",
        *(f"  - {line}" for line in result.reasoning),
    ]
    return "\n".join(lines)


@click.command("plan", cls=OneLineCommand)
@click.option("--model", "model_name", required=True, help="HF folder, smollm2, a preset (llama3-8b...) or random:<preset>.")
@click.option("--gpu", type=click.Choice(sorted(GPU_SPECS)), default=None, help=f"Built-in analytical GPU (default {DEFAULT_GPU}).")
@click.option("--gpu-profile", type=click.Path(dir_okay=False), default=None, help="Measured dense-step profile (JSON).")
@click.option("--shard-gbps", type=float, multiple=True, help="Read GB/s of a shard; repeat for a fixed pool. [60]")
@click.option("--shard-mem-gib", type=FiniteFloatRange(min=0, min_open=True), multiple=True,
              help="Memory of each shard (GiB), one figure for all; unset: not a limit.")
@click.option("--max-shards", type=int, default=64, show_default=True, help="Most shards with one --shard-gbps.")
@click.option("--shard-overhead-us", type=FiniteFloatRange(min=0), default=100.0, show_default=True,
              help="Per attend call.")
@click.option("--link-gbps", type=float, default=50.0, show_default=True, help="GPU<->host link for q, k, v, o.")
@click.option("--prompt-len", type=int, required=True)
@click.option("--output-len", type=int, required=True)
@click.option("--max-latency-ms", type=float, default=None, help="Latency per token limit.")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_BYTES)), default="bfloat16", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(
    model_name: str, gpu: str | None, gpu_profile: str | None, shard_gbps: tuple[float, ...],
    shard_mem_gib: tuple[float, ...], max_shards: int, shard_overhead_us: float, link_gbps: float, prompt_len: int,
    output_len: int, max_latency_ms: float | None, dtype: str, as_json: bool,
) -> None:
    """Plan a deployment from the model's config alone (no weights are loaded)."""
    if gpu and gpu_profile:
        raise click.UsageError("give --gpu or --gpu-profile, not both")
    if len(set(shard_mem_gib)) > 1:  # click kept the last of a repeated option silently
        raise click.UsageError("--shard-mem-gib is one figure for every shard: the plan does not model shards of "
                               "different memory (give the smallest, or plan each kind of host on its own)")
    config = resolve_model_config(model_name)
    try:
        request = PlanRequest(
            prompt_len=prompt_len,
            output_len=output_len,
            shard_bytes_per_s=tuple(g * 1e9 for g in shard_gbps) or (60e9,),
            max_shards=max_shards,
            shard_overhead_s=shard_overhead_us * 1e-6,
            shard_memory_bytes=int(shard_mem_gib[0] * (1 << 30)) if shard_mem_gib else None,
            link_bytes_per_s=link_gbps * 1e9,
            max_latency_s=None if max_latency_ms is None else max_latency_ms / 1e3,
            max_model_len=config.max_position_embeddings,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    shape = shape_of(config, DTYPE_BYTES[dtype])
    dense_step_s, memory, gpu_label = resolve_gpu(gpu, gpu_profile, shape, model_name)
    try:
        result = plan_deployment(shape, dense_step_s, request, memory)
    except PlanError as exc:
        raise OneLineError(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"model": model_name, "gpu": gpu_label, **result.to_dict()}, indent=2))
    else:
        click.echo(format_text(model_name, gpu_label, request, result))
