"""``fdctl generate``: one prompt in, its continuation on stdout.

Parsing (``GenerateOptions``) is kept apart from the engine call
(``run_generate``): the single-process reference, or a cluster of in-process
shards or shard daemons. In-process shards get by default the KV memory the one
prompt needs (``one_shot_kv_bytes``), not the share of free memory a server takes.
"""
from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

import click

from fastdecode.cli.errors import OneLineCommand, one_line_errors
from fastdecode.cli.sizes import SIZE
from fastdecode.cli.start_shard import shard_addresses_option


@dataclass(frozen=True)
class GenerateOptions:
    model: str = "smollm2"
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    is_chat: bool = False
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    model_seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    num_shards: int = 0  # in-process KVShards; 0 with no addresses: the single-process reference
    shard_addresses: tuple[str, ...] = ()
    curve_dir: str | None = None  # CURVE keys for the shard links (fdctl keygen)
    kv_memory_bytes: int | None = None  # per in-process shard; None: what this prompt needs (one_shot_kv_bytes)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise click.UsageError("give exactly one of --prompt and --prompt-ids")
        if self.is_chat and self.prompt is None:
            raise click.UsageError("--chat needs --prompt")
        if self.num_shards < 0:
            raise click.UsageError("--shards must be non-negative")
        if self.num_shards and self.shard_addresses:
            raise click.UsageError("give either --shards or --shard, not both")
        if self.kv_memory_bytes is not None:
            if not self.num_shards:
                raise click.UsageError("--kv-memory sizes in-process shards: give it with --shards N (a shard "
                                       "daemon has its own, from start-shard --kv-memory)")
            if self.kv_memory_bytes < 1 << 20:
                raise click.UsageError(f"--kv-memory must be at least 1 MiB, got {self.kv_memory_bytes} bytes")


def parse_prompt_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise click.UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise click.UsageError("--prompt-ids is empty")
    return ids


def one_shot_kv_bytes(model, num_tokens: int) -> int:
    """KV memory for each in-process shard of a one-shot run: one sequence of ``num_tokens`` whole (any
    shard may get it), in pages of the largest size a shard takes, and no less than an embedded shard's
    floor. Far less than a server's share of free memory, which every shard would pre-fault at start."""
    from fastdecode.actors.cluster import MIN_EMBEDDED_KV_BYTES
    from fastdecode.actors.kvshard import ShardConfig

    page = ShardConfig.MAX_PAGE_SIZE
    tokens = -(-num_tokens // page) * page
    return max(MIN_EMBEDDED_KV_BYTES, tokens * model.config.kv_bytes_per_token(model.dtype.itemsize))


def run_generate(options: GenerateOptions) -> Any:
    """Load the model, tokenize the prompt, generate; returns a ``GenerationResult``."""
    from fastdecode.actors.model import load_model
    from fastdecode.actors.reference import check_prompt, reference_generate
    from fastdecode.actors.request import SamplingParams

    params = SamplingParams(
        max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
        top_k=options.top_k, seed=options.seed, ignore_eos=options.ignore_eos, stop=options.stop,
    )
    model, tokenizer = load_model(options.model, dtype=options.dtype, device=options.device, seed=options.model_seed)
    if options.prompt_token_ids is not None:
        prompt_ids = list(options.prompt_token_ids)
    elif options.is_chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": options.prompt}])
    else:
        prompt_ids = tokenizer.encode(options.prompt or "")
    check_prompt(prompt_ids, model)
    click.echo(f"{options.model} on {model.device} ({str(model.dtype).removeprefix('torch.')}): "
               f"{len(prompt_ids)} prompt tokens, up to {options.max_tokens} new", err=True)
    if not options.num_shards and not options.shard_addresses:
        return reference_generate(model, tokenizer, prompt_ids, params)
    config = cluster_config(options, model, len(prompt_ids))
    del model  # the cluster loads its own copy next to its shards
    return asyncio.run(_generate_on_cluster(config, prompt_ids, params))


def cluster_config(options: GenerateOptions, model, num_prompt_tokens: int):
    """The ClusterConfig of a one-shot run. In-process shards without ``--kv-memory`` hold what this prompt
    and ``--max-tokens`` need, and the Executor admits no longer sequence."""
    from fastdecode.actors.cluster import ClusterConfig
    from fastdecode.actors.executor import ExecutorConfig

    kv_bytes, executor = options.kv_memory_bytes, ExecutorConfig()
    if options.num_shards and kv_bytes is None:
        num_tokens = min(num_prompt_tokens + options.max_tokens, model.config.max_position_embeddings)
        kv_bytes = one_shot_kv_bytes(model, num_tokens)
        executor = ExecutorConfig(max_model_len=num_tokens)
    return ClusterConfig(model=options.model, seed=options.model_seed, dtype=options.dtype, device=options.device,
                         num_shards=options.num_shards, shard_addresses=options.shard_addresses,
                         shard_kv_memory_bytes=kv_bytes if options.num_shards else None, executor=executor,
                         curve_dir=options.curve_dir)


async def _generate_on_cluster(config, prompt_ids: list[int], params) -> Any:
    from fastdecode.actors.api import AsyncLLM

    async with await AsyncLLM.start(config) as llm:
        return await llm.generate(prompt_ids, params)


@click.command("generate", cls=OneLineCommand)
@click.option("--model", default="smollm2", show_default=True,
              help="HF model folder, 'smollm2' or 'random:<preset>'.")
@click.option("--prompt", default=None, help="Prompt text (tokenized as the model's tokenizer does).")
@click.option("--prompt-ids", default=None, help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--chat", "is_chat", is_flag=True, help="Wrap --prompt as a user message in the chat template.")
@click.option("--max-tokens", default=16, show_default=True, type=int, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 disables.")
@click.option("--seed", default=None, type=int, help="Sampling seed (also the weights' seed for random: models).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line of stdout.")
@click.option("--shards", "num_shards", default=0, show_default=True, type=int,
              help="In-process KVShards (0: the single-process reference).")
@click.option("--shard", "shard_addresses", multiple=True, callback=shard_addresses_option,
              help="Address of a running shard daemon (repeatable).")
@click.option("--curve-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="CURVE key folder (fdctl keygen) for encrypted, authenticated shard links.")
@click.option("--kv-memory", "kv_memory_bytes", default=None, type=SIZE,
              help="KV memory per in-process shard, e.g. 2GiB (default: what the prompt and --max-tokens need).")
def generate(model: str, prompt: str | None, prompt_ids: str | None, is_chat: bool, max_tokens: int,
             temperature: float, top_p: float, top_k: int, seed: int | None, dtype: str, device: str,
             ignore_eos: bool, stop: tuple[str, ...], as_json: bool, num_shards: int,
             shard_addresses: tuple[str, ...], curve_dir: str | None, kv_memory_bytes: int | None) -> None:
    """Generate a continuation of one prompt and print it."""
    with one_line_errors():
        options = GenerateOptions(
            model=model, prompt=prompt,
            prompt_token_ids=None if prompt_ids is None else parse_prompt_ids(prompt_ids),
            is_chat=is_chat, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, model_seed=seed or 0, dtype=dtype, device=device, ignore_eos=ignore_eos, stop=stop,
            num_shards=num_shards, shard_addresses=shard_addresses, curve_dir=curve_dir,
            kv_memory_bytes=kv_memory_bytes,
        )
        result = run_generate(options)
    if as_json:
        line = {"prompt_token_ids": result.prompt_token_ids, "token_ids": result.token_ids,
                "text": result.text, "finish_reason": result.finish_reason}
        click.echo(json.dumps(line, ensure_ascii=False))
    else:
        sys.stdout.write(result.text + "\n")
        sys.stdout.flush()
