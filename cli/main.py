"""The ``fdctl`` command: a click group whose sub-commands live one per module.

Each sub-command module is imported only when it runs, so ``fdctl --help`` and a
shard daemon start without importing torch.
"""
from __future__ import annotations

import importlib

import click

# sub-command name -> (module under fastdecode.cli, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("generate", "generate", "Generate a continuation of one prompt."),
    "make-random-model": ("make_random_model", "make_random_model_command", "Write a random:<preset> model as a HF folder."),
    "bench": ("bench", "bench", "Benchmarks that print JSON figures: offline, roofline, project, scaling, serve."),
    "plan": ("plan", "plan", "Plan batch size, shards, tokens/s and host memory for a model."),
    "trace-plot": ("trace_plot", "trace_plot", "Render a step trace as a PNG timeline."),
    "serve": ("serve", "serve_command", "Serve a model over OpenAI-compatible HTTP and WebSocket."),
    "start-gpu": ("serve", "start_gpu_command", "GPU-host daemon: Executor and Frontend in front of remote shards."),
    "client": ("client", "client", "Stream one prompt from a running server over WebSocket."),
    "start-shard": ("start_shard", "start_shard", "CPU-host daemon: one KVShard (KV-cache and attention)."),
    "keygen": ("keygen", "keygen", "Make CURVE keys for encrypted, authenticated shard links."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        module = importlib.import_module(f"fastdecode.cli.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastdecode")
def main() -> None:
    """fastdecode: LLM serving with the KV-cache on the CPUs of many hosts."""


if __name__ == "__main__":
    main()
