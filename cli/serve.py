"""``fdctl serve`` (the whole embedded cluster behind the Frontend) and
``fdctl start-gpu`` (the Executor and the Frontend in front of remote shards).

Options become a ``ServeConfig``; ``fastdecode.actors.frontend.serve`` runs it.
The API key may come from ``FASTDECODE_API_KEY`` (``API_KEY_ENV``: read here and by ``fdctl bench serve``).
"""
from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import Any

import click

from fastdecode.cli.errors import OneLineCommand, OneLineError, one_line_errors
from fastdecode.cli.sizes import SIZE, CountParamType
from fastdecode.cli.log_options import LOG_LEVEL_OPTION, configure_logging
from fastdecode.cli.start_shard import shard_addresses_option
from fastdecode.actors.modes import MODES
from fastdecode.actors.prefix_cache import DEFAULT_CACHE_BYTES
from fastdecode.actors.reasoning_parsers import REASONING_PARSERS
from fastdecode.actors.tool_parsers import PARSERS as TOOL_CALL_PARSERS
from fastdecode.scheduler.config import ADMISSION_MODES
from fastdecode.transport.errors import TransportError

API_KEY_ENV = "FASTDECODE_API_KEY"


class NameList(click.ParamType):
    """A list of names as vLLM takes it, a JSON list (``'["https://a.example", "https://b.example"]'``), or
    comma-separated (``https://a.example,https://b.example``); the values are checked by ``FrontendConfig``."""

    name = "LIST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if not text.startswith("["):
            return tuple(part.strip() for part in text.split(",") if part.strip())
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            self.fail(f"{text!r} is not a JSON list: {exc.msg}", param, ctx)
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            self.fail(f"{text!r} must be a JSON list of strings", param, ctx)
        return tuple(names)


DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's other names
SERVED_MODEL_NAME = "--served-model-name"
JINJA_CHARS = "{}\n"  # vLLM's test: a --chat-template holding one of them is a template, not a file path


def _dtype_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return DTYPE_ALIASES.get(value, value)


def _served_model_name(ctx: click.Context, param: click.Parameter, names: tuple[str, ...]) -> str | None:
    """One name: vLLM's further names are aliases a request's "model" may use, which the Frontend does not take."""
    if len(names) > 1:
        raise click.BadParameter(
            f"this server answers to one model name, got {len(names)}: {', '.join(map(repr, names))} (vLLM's "
            "further names are aliases, not taken here; a MODEL right after the name is read as a name too, as by "
            "vLLM: give it first or with --model)", ctx, param)
    return names[0] if names else None


def _chat_template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """vLLM's --chat-template: a file's text, or the template itself when no such file opens and the value holds
    '{', '}' or a newline; checked to parse here, before the model loads."""
    from fastdecode.actors.model.errors import ModelError
    from fastdecode.actors.model.tokenizer import compile_chat_template

    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as handle:
            template = handle.read()
    except OSError as exc:
        if not any(char in value for char in JINJA_CHARS):
            raise click.BadParameter(f"{value!r} looks like a file path, but it cannot be opened: "
                                     f"{exc.strerror or exc}", ctx, param) from None
        try:
            template = codecs.decode(value, "unicode_escape")  # vLLM's: an inline '\n' is a newline
        except UnicodeDecodeError as escape:
            raise click.BadParameter(f"the template's escapes do not decode: {escape.reason}", ctx, param) from None
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{value} is not UTF-8 text: {exc.reason}", ctx, param) from None
    try:
        compile_chat_template(template)
    except ModelError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return template


class ServeCommand(OneLineCommand):
    """``serve`` and ``start-gpu``: ``--served-model-name`` takes the values up to the next option, as vLLM's
    (``--served-model-name a b``), so that a second name is not taken for the positional MODEL."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _values_as_repeats(args, SERVED_MODEL_NAME))


def _values_as_repeats(args: list[str], option: str) -> list[str]:
    """``args`` with an option's further values repeated after it: ``--opt a b --x`` is ``--opt a --opt b --x``."""
    rewritten: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        rewritten.append(arg)
        index += 1
        if arg == "--":  # the rest is positional
            return rewritten + args[index:]
        if arg != option or index == len(args):
            continue  # '--opt=a' is one value, as argparse reads it
        rewritten.append(args[index])  # its value, even one that starts with '-'
        index += 1
        while index < len(args) and not args[index].startswith("-"):
            rewritten += [option, args[index]]
            index += 1
    return rewritten


def _one_gpu(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value != 1:
        raise click.BadParameter(f"{value}: fastdecode runs the model on one GPU and scales the KV-cache and "
                                 "attention out over CPU shards instead (--shard); give 1 or leave it out", ctx, param)
    return value


def _common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", default="smollm2", show_default=True,
                     help="HF model folder, 'smollm2' or 'random:<preset>'."),
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind."),
        click.option("--port", default=8000, show_default=True, type=int, help="Port to bind (0: any free one)."),
        click.option("--api-key", default=None, envvar=[API_KEY_ENV, "VLLM_API_KEY"], show_envvar=True,
                     help="Bearer key every /v1 request must present (or vLLM's VLLM_API_KEY)."),
        click.option(SERVED_MODEL_NAME, multiple=True, callback=_served_model_name,
                     help="Model id in the API (default: --model); one name (vLLM's further names, aliases, are "
                          "refused)."),
        click.option("--max-model-len", default=None, type=CountParamType(min=1),
                     help="Context length (default: the model's); vLLM's forms: 4096, 4k (4000), 4K (4096)."),
        click.option("--max-num-seqs", default=256, show_default=True, type=int,
                     help="Most sequences decoded together; more wait in the queue."),
        click.option("--max-queue", default=4096, show_default=True, type=int,
                     help="Most requests waiting; past it requests get 429."),
        click.option("--admission", default="sls", show_default=True, type=click.Choice(ADMISSION_MODES),
                     help="sls: start sequences at a steady rate once the batch is half full, where the "
                          "predicted step at the peak context is attention-bound (else at once); "
                          "all-at-once: fill every free slot at once."),
        click.option("--overcommit", default=1.0, show_default=True, type=click.FloatRange(1.0, 100.0),
                     help="How far the KV that running sequences reserve (prompt + max_tokens, see "
                          "--max-reserved-output) may exceed a node's memory; above 1 a full node preempts its "
                          "youngest sequence."),
        click.option("--max-reserved-output", default=4096, show_default=True, type=click.IntRange(min=0),
                     help="Most output tokens ahead of its length a sequence reserves KV for, and at most an "
                          "eighth of its node (a larger max_tokens, e.g. a chat request's default of the whole "
                          "context, counts as this many; a node that fills up preempts its youngest). 0: reserve "
                          "the whole max_tokens."),
        click.option("--max-num-batched-tokens", default=None, type=CountParamType(min=0),
                     help="Most tokens one step carries (each decoding sequence counts 1); a longer prompt is "
                          "prefilled in chunks over several steps while the others keep decoding. 0: no chunking. "
                          "[default: 2048 on a GPU (or twice --max-num-seqs where more), 256 on a CPU]"),
        click.option("--dtype", default="auto", show_default=True, callback=_dtype_option,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16", *DTYPE_ALIASES]),
                     help="Weights' and activations' dtype (vLLM's names: half is float16, float is float32). "
                          "auto: on a GPU the checkpoint's half type (float16 stays float16, others bfloat16), "
                          "on a CPU float32."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seed of the engine's generator, from which requests without their own seed draw "
                          "(vLLM's), and of the weights of random: models."),
        click.option("--chat-template", default=None, callback=_chat_template,
                     help="Chat template used instead of the tokenizer's (vLLM's): a file, or the Jinja template "
                          "itself."),
        click.option("--generation-config", default="auto", show_default=True,
                     help="Sampling defaults for what a request leaves out (vLLM's): auto, the model's "
                          "generation_config.json; vllm, none; or a folder holding the generation_config.json to use."),
        click.option("--no-pipeline", "is_unpipelined", is_flag=True,
                     help="One mini-batch per step instead of two overlapped ones."),
        click.option("--drain-timeout", "drain_timeout_s", default=30.0, show_default=True,
                     type=click.FloatRange(0, 86400),
                     help="On SIGTERM: seconds the accepted requests may still run (new ones get 503)."),
        click.option("--curve-dir", default=None, type=click.Path(exists=True, file_okay=False),
                     help="CURVE key folder (fdctl keygen) for encrypted, authenticated shard links."),
        click.option("--insecure-bind-any", "is_insecure_bind_any", is_flag=True,
                     help="Allow a non-loopback --host without --api-key."),
        click.option("--allowed-origins", default='["*"]', show_default=True, type=NameList(),
                     help="CORS: origins whose browser pages may call the API and open /v1/stream (JSON list or "
                          "comma-separated; '*': any)."),
        click.option("--allowed-methods", default='["*"]', show_default=True, type=NameList(),
                     help="CORS: HTTP methods browsers may use (JSON list or comma-separated)."),
        click.option("--allowed-headers", default='["*"]', show_default=True, type=NameList(),
                     help="CORS: request headers browsers may send (JSON list or comma-separated)."),
        click.option("--allow-credentials/--no-allow-credentials", "is_credentials_allowed", default=False,
                     show_default=True, help="CORS: let browsers send cookies and HTTP auth along."),
        LOG_LEVEL_OPTION,
        click.option("--disable-uvicorn-access-log", "--disable-access-log", "is_access_log_disabled", is_flag=True,
                     help="No INFO line per HTTP request (client, method, path without query, status, bytes, "
                          "seconds); vLLM's name."),
        click.option("--disable-log-requests", "is_request_log_disabled", is_flag=True,
                     help="No INFO line per finished request (ids, finish reason, token counts, TTFT, e2e); "
                          "vLLM's name."),
        click.option("--mode", default=None, type=click.Choice(MODES),
                     help="Where the KV-cache lives: shards (CPU shards attend, the default), gpu-only (on the GPU, "
                          "each step one CUDA graph; no shards) or hybrid (the faster of the two for the batch, "
                          "measured at start-up)."),
        click.option("--gpu-memory-utilization", default=None, type=click.FloatRange(0, 1, min_open=True),
                     help="vLLM's: the share of the GPU's memory this server may hold; the KV-cache on the GPU "
                          "(--mode gpu-only or hybrid) gets what the weights leave of it. [default: 0.8 of the "
                          "memory free after loading, or less where one longest prompt's prefill would not fit "
                          "beside it]"),
        click.option("--gpu-kv-memory", "gpu_kv_memory_bytes", default=None, type=SIZE,
                     help="The KV-cache on the GPU (--mode gpu-only or hybrid), e.g. 20GiB, instead of "
                          "--gpu-memory-utilization."),
        click.option("--enable-prefix-caching/--no-enable-prefix-caching", "is_prefix_caching", default=True,
                     show_default=True,
                     help="Keep the K/V of prompts' leading 32-token blocks, so a later prompt that begins alike (a "
                          "system prompt, a conversation's earlier turns) computes only the rest (vLLM's)."),
        click.option("--prefix-cache-memory", "prefix_cache_memory_bytes", default="2GiB", show_default=True,
                     type=SIZE, help="Memory of the model's device (the GPU's on CUDA; at most a tenth of a GPU KV "
                                    "pool sized from the device's memory) the prefix cache may hold; the least "
                                    "recently used blocks go."),
        click.option("--max-logprobs", default=20, show_default=True, type=click.IntRange(min=-1),
                     help="The most top logprobs a request may ask per token (logprobs, top_logprobs, "
                          "prompt_logprobs; more is a 400), vLLM's; -1: the whole vocabulary."),
        click.option("--enable-auto-tool-choice", "is_auto_tool_choice", is_flag=True,
                     help='Parse the tool calls a model chooses to write (tool_choice "auto", the default when a '
                          "request gives tools) with --tool-call-parser (vLLM's). Named and required tool choices "
                          "work without it."),
        click.option("--tool-call-parser", default=None, type=click.Choice(TOOL_CALL_PARSERS),
                     help="How the model writes tool calls: hermes (<tool_call> blocks: Hermes, Qwen 2.5 and later) "
                          "or llama3_json (Llama 3.1 and later's JSON calls)."),
        click.option("--reasoning-parser", default=None, type=click.Choice(REASONING_PARSERS),
                     help="Split a reasoning model's <think> block from its answer (vLLM's): the chat response's "
                          "reasoning_content. deepseek_r1 (DeepSeek-R1 and its distills) or qwen3."),
        click.option("--response-role", default="assistant", show_default=True,
                     help="The role of a chat response's message (vLLM's)."),
        click.option("--enforce-eager", "is_eager", is_flag=True,
                     help="No CUDA graphs and no compiled dense segments: every step runs eagerly (vLLM's)."),
        click.option("--tensor-parallel-size", "-tp", default=1, show_default=True, type=int, expose_value=False,
                     callback=_one_gpu,
                     help="vLLM's: 1 only. The model runs on one GPU; the KV-cache and attention scale out over "
                          "shards (--shard) instead."),
        click.option("--trust-remote-code", is_flag=True, expose_value=False,
                     help="Taken for vLLM's command lines: fastdecode runs no code from a model folder (it builds "
                          "the Llama architecture itself), so there is none to trust."),
        click.option("--disable-log-stats", is_flag=True, expose_value=False,
                     help="Taken for vLLM's command lines: fastdecode logs no periodic stats lines (the figures are "
                          "on /metrics)."),
        click.argument("model_tag", required=False, metavar="[MODEL]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _model(ctx: click.Context, model_tag: str | None, model: str) -> str:
    """The model: vLLM's positional ``serve MODEL``, or --model (one of them)."""
    if model_tag is None:
        return model
    if ctx.get_parameter_source("model") is not click.core.ParameterSource.DEFAULT and model != model_tag:
        raise OneLineError(f"give the model once: as an argument ({model_tag}) or with --model ({model})")
    return model_tag


def build_config(*, model: str, host: str, port: int, api_key: str | None, served_model_name: str | None,
                 max_model_len: int | None, max_num_seqs: int, max_queue: int, dtype: str, device: str, seed: int,
                 generation_config: str = "auto", chat_template: str | None = None,
                 admission: str = "sls", overcommit: float = 1.0, max_reserved_output: int = 4096,
                 max_num_batched_tokens: int | None = None,
                 is_unpipelined: bool, num_shards: int, shard_addresses: tuple[str, ...],
                 kv_memory_bytes: int | None, drain_timeout_s: float = 30.0, curve_dir: str | None = None,
                 is_insecure_bind_any: bool = False, allowed_origins: tuple[str, ...] = ("*",),
                 allowed_methods: tuple[str, ...] = ("*",), allowed_headers: tuple[str, ...] = ("*",),
                 is_credentials_allowed: bool = False, is_access_log_disabled: bool = False, is_eager: bool = False,
                 is_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
                 response_role: str = "assistant", max_logprobs: int = 20, reasoning_parser: str | None = None,
                 gpu_memory_utilization: float | None = None, gpu_kv_memory_bytes: int | None = None,
                 mode: str | None = None, is_prefix_caching: bool = True,
                 prefix_cache_memory_bytes: int = DEFAULT_CACHE_BYTES):
    """A validated ``ServeConfig``; bad values raise ``OneLineError``."""
    from fastdecode.transport.sockets import is_loopback_address

    if not api_key and not is_insecure_bind_any and not is_loopback_address(f"tcp://{host}:{port}"):
        raise OneLineError(f"refusing to serve on {host} without --api-key: anyone who reaches it could use it "
                           "(give --api-key, or --insecure-bind-any to accept that)")
    from fastdecode.actors.cluster import ClusterConfig
    from fastdecode.actors.executor import ExecutorConfig
    from fastdecode.actors.frontend import FrontendConfig, ServeConfig
    from fastdecode.actors.frontend.tool_fields import ToolServing
    from fastdecode.scheduler import SchedulerConfig

    try:
        executor = ExecutorConfig(max_model_len=max_model_len, max_queue=max_queue, is_pipelined=not is_unpipelined,
                                  max_num_batched_tokens=max_num_batched_tokens, max_logprobs=max_logprobs,
                                  prefix_cache_bytes=prefix_cache_memory_bytes if is_prefix_caching else 0,
                                  scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, admission=admission,
                                                            overcommit=overcommit,
                                                            max_reserved_output=max_reserved_output or None))
        cluster = ClusterConfig(model=model, seed=seed, dtype=dtype, device=device, generation_config=generation_config,
                                num_shards=num_shards,
                                shard_addresses=shard_addresses, shard_kv_memory_bytes=kv_memory_bytes,
                                executor=executor, curve_dir=curve_dir, chat_template=chat_template,
                                gpu_memory_utilization=gpu_memory_utilization, gpu_kv_memory_bytes=gpu_kv_memory_bytes,
                                mode=mode,
                                is_heap_frozen=True, is_cuda_graphs=not is_eager, is_compiled=not is_eager)
        frontend = FrontendConfig(served_model_name=served_model_name or model, model=model,
                                  api_key=api_key or None, allowed_origins=allowed_origins,
                                  allowed_methods=allowed_methods, allowed_headers=allowed_headers,
                                  is_credentials_allowed=is_credentials_allowed,
                                  tool_serving=ToolServing(is_auto_tool_choice, tool_call_parser),
                                  response_role=response_role, reasoning_parser=reasoning_parser)
        return ServeConfig(cluster=cluster, frontend=frontend, host=host, port=port, drain_timeout_s=drain_timeout_s,
                           is_access_logged=not is_access_log_disabled)
    except ValueError as exc:
        raise OneLineError(str(exc)) from None


def run_server(config, *, log_level: str = "info", is_request_log_disabled: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, logging at ``log_level`` and above (without the per-request lines when
    ``is_request_log_disabled``); start-up failures become one line and exit code 2."""
    import logging

    from fastdecode.actors.frontend import serve
    from fastdecode.actors.frontend.generation import REQUEST_LOGGER
    from fastdecode.transport.event_loop import run_event_loop

    configure_logging(log_level)
    if is_request_log_disabled:
        logging.getLogger(REQUEST_LOGGER).setLevel(logging.WARNING)
    model = config.cluster.model

    def announce(url: str) -> None:
        click.echo(f"serving {model} on {url}", err=True)

    with one_line_errors():
        try:
            run_event_loop(serve(config, on_ready=announce))
        except TransportError:  # a shard that does not answer or refuses (one_line_errors words it)
            raise
        except (ValueError, OSError) as exc:  # a model the engine cannot serve, a busy port...
            raise OneLineError(str(exc)) from None
    click.echo("stopped", err=True)


@click.command("serve", cls=ServeCommand)
@_common_options
@click.option("--shards", "num_shards", default=None, type=int,
              help="In-process KV shards (default 1; 0: single process, KV in torch).")
@click.option("--shard", "shard_addresses", multiple=True, metavar="ADDR", callback=shard_addresses_option,
              help="A running shard daemon (repeatable); replaces in-process shards.")
@click.option("--kv-memory", "kv_memory_bytes", default=None, type=SIZE,
              help="KV memory per in-process shard, e.g. 2GiB (default: a share of free memory).")
@click.pass_context
def serve_command(ctx: click.Context, num_shards: int | None, shard_addresses: tuple[str, ...],
                  kv_memory_bytes: int | None, log_level: str, is_request_log_disabled: bool, model_tag: str | None,
                  model: str, **options: Any) -> None:
    """Serve MODEL (or --model) over OpenAI-compatible HTTP and WebSocket (the whole cluster in one process)."""
    if num_shards is not None and shard_addresses:
        raise OneLineError("give either --shards or --shard, not both")
    if kv_memory_bytes is not None and shard_addresses:
        raise OneLineError("--kv-memory sizes in-process shards: a shard daemon has its own (start-shard --kv-memory)")
    if num_shards is None:
        num_shards = 0 if shard_addresses or options.get("mode") == "gpu-only" else 1
    run_server(build_config(num_shards=num_shards, shard_addresses=shard_addresses, kv_memory_bytes=kv_memory_bytes,
                            model=_model(ctx, model_tag, model), **options),
               log_level=log_level, is_request_log_disabled=is_request_log_disabled)


@click.command("start-gpu", cls=ServeCommand)
@_common_options
@click.option("--shard", "shard_addresses", multiple=True, metavar="ADDR", required=True,
              callback=shard_addresses_option, help="A running shard daemon (repeatable; at least one).")
@click.pass_context
def start_gpu_command(ctx: click.Context, shard_addresses: tuple[str, ...], log_level: str,
                      is_request_log_disabled: bool, model_tag: str | None, model: str, **options: Any) -> None:
    """The GPU-host daemon for MODEL (or --model): the Executor and the Frontend in front of remote shards."""
    run_server(build_config(num_shards=0, shard_addresses=shard_addresses, kv_memory_bytes=None,
                            model=_model(ctx, model_tag, model), **options),
               log_level=log_level, is_request_log_disabled=is_request_log_disabled)
