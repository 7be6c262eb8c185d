"""``fdctl make-random-model``: write a ``random:<preset>`` model as a HF folder."""
from __future__ import annotations

from pathlib import Path

import click

from fastdecode.cli.errors import OneLineCommand, OneLineError, one_line_errors


def make_random_model(preset: str, seed: int, out: Path, dtype: str = "float32") -> None:
    """Generate the preset's weights on the CPU (as ``load_model('random:<preset>', seed=seed,
    device='cpu')`` does) and write config, safetensors and tokenizer files into ``out``.

    The preset and the folder are checked (the folder created) before the weights are made: a folder that
    cannot be created or written is a ``OneLineError`` at once, not a traceback after minutes."""
    import torch

    from fastdecode.actors.model.hf_dir import write_hf_model
    from fastdecode.actors.model.loader import random_model, resolve_dtype
    from fastdecode.actors.model.presets import preset_config

    preset_config(preset)  # an unknown preset fails before the folder is made
    prepare_out_folder(out)
    model, tokenizer = random_model(preset, seed=seed, dtype=resolve_dtype(dtype), device=torch.device("cpu"))
    try:
        write_hf_model(out, model, tokenizer)
    except OSError as exc:
        raise OneLineError(f"cannot write the model into --out {out}: {os_reason(exc)}") from None


def prepare_out_folder(out: Path) -> None:
    """Create ``out`` (and its parents), or accept it if it is an empty folder; OneLineError otherwise."""
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise OneLineError(f"--out {out} exists and is not an empty folder")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OneLineError(f"cannot create --out {out}: {os_reason(exc)}") from None


def os_reason(exc: OSError) -> str:
    """``No such file or directory: '/proc/x'`` rather than ``[Errno 2] ...``."""
    if exc.strerror is None:
        return str(exc)
    return f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror


@click.command("make-random-model", cls=OneLineCommand)
@click.option("--preset", required=True,
              help="tiny, tiny-qwen3, smollm2-135m, llama3-8b, llama3-70b, qwen2-7b or qwen3-8b.")
@click.option("--seed", default=0, show_default=True, type=int, help="Weights seed.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to create.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
def make_random_model_command(preset: str, seed: int, out: Path, dtype: str) -> None:
    """Write a seeded random model (config.json, safetensors, tokenizer) that transformers loads."""
    with one_line_errors():
        make_random_model(preset, seed, out, dtype)
    click.echo(f"wrote random:{preset} (seed {seed}) to {out}", err=True)
