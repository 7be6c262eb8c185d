"""Hugging Face model folders: reading (config, safetensors, tokenizer) and writing.

A folder holds ``config.json``, one or several ``*.safetensors`` (with
``model.safetensors.index.json`` when sharded; older folders: ``pytorch_model*.bin``), ``tokenizer.json``,
``tokenizer_config.json`` (chat template) and ``generation_config.json`` (EOS ids and the
recommended sampling defaults).
"""
from __future__ import annotations

import dataclasses
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastdecode.actors.model.config import ModelConfig, SamplingDefaults
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.jsonfile import read_json, write_json
from fastdecode.actors.model.llama import LlamaModel
from fastdecode.actors.model.tokenizer import Tokenizer
from fastdecode.actors.model.weights import hf_slices, load_hf_weights

INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 << 30
# generation_config.json sampling fields -> SamplingDefaults fields, with the value transformers' GenerationConfig
# has by default: vLLM reads only the fields that differ from it (``to_diff_dict``), so a file's ``top_k: 50``
# changes nothing there, nor here
_SAMPLING_FIELDS = {"temperature": ("temperature", 1.0), "top_p": ("top_p", 1.0), "top_k": ("top_k", 50),
                    "repetition_penalty": ("repetition_penalty", 1.0), "min_p": ("min_p", None),
                    "max_new_tokens": ("max_tokens", None)}


def read_hf_config(folder: Path) -> ModelConfig:
    """The model's config, with EOS/BOS ids and sampling defaults from ``generation_config.json`` where it
    has them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    config = ModelConfig.from_hf_dict(read_json(folder / "config.json", required=True))
    generation = read_json(folder / "generation_config.json", required=False)
    eos = generation.get("eos_token_id")
    bos = generation.get("bos_token_id")
    try:
        if eos is not None:
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
            config = dataclasses.replace(config, eos_token_ids=eos_ids)
        if bos is not None:
            config = dataclasses.replace(config, bos_token_id=int(bos))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"corrupt generation_config.json in {folder}: {exc}") from None
    try:
        defaults = sampling_defaults(generation)
    except ModelError as exc:
        raise ModelError(f"bad generation_config.json in {folder}: {exc}") from None
    return dataclasses.replace(config, sampling_defaults=defaults)


def chosen_sampling_defaults(source: str) -> SamplingDefaults | None:
    """The sampling defaults vLLM's ``--generation-config`` picks: ``auto``, the model's own (None here); ``vllm``,
    none (the engine's); a folder, the ``generation_config.json`` in it (ModelError when it has none or a bad one)."""
    if source == "auto":
        return None
    if source == "vllm":
        return SamplingDefaults()
    folder = Path(source)
    if not (folder / "generation_config.json").is_file():
        raise ModelError(f"--generation-config {source}: no generation_config.json there (or give auto or vllm)")
    try:
        return sampling_defaults(read_json(folder / "generation_config.json", required=True))
    except ModelError as exc:
        raise ModelError(f"bad generation_config.json in {folder}: {exc}") from None


def sampling_defaults(generation: dict[str, Any]) -> SamplingDefaults:
    """The sampling defaults of a ``generation_config.json`` object (vLLM's ``get_diff_sampling_param``)."""
    values = {}
    for key, (name, hf_default) in _SAMPLING_FIELDS.items():
        value = generation.get(key)
        if value is None or value == hf_default:
            continue
        if isinstance(value, float) and name in ("top_k", "max_tokens") and value.is_integer():
            value = int(value)
        values[name] = value
    return SamplingDefaults(**values)


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file for sharded folders; {"": file} per file otherwise."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"corrupt {index_path}: no weight_map")
        files = {name: folder / str(file) for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise ModelError(f"missing weights file {path} (listed in {INDEX_FILE})")
        return files
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        paths = sorted(folder.glob("pytorch_model*.bin"))  # the older format, as vLLM loads it
    if not paths:
        raise ModelError(f"no *.safetensors (or pytorch_model*.bin) weights in {folder}")
    return {f"#{i}": path for i, path in enumerate(paths)}


class _TorchFile:
    """A ``pytorch_model*.bin`` read as a safetensors handle is: its tensors by name. Loaded with
    ``weights_only`` (no code from the file runs), memory-mapped where the file is torch's zip format (the
    pre-1.6 format cannot be; vLLM loads it too)."""

    def __init__(self, path: Path) -> None:
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:  # a damaged or non-torch file: pickle, zip and torch raise many kinds
            raise ModelError(f"corrupt weights file {path}: {exc}") from None
        if not isinstance(self._tensors, dict):
            raise ModelError(f"corrupt weights file {path}: not a state dict")

    def keys(self):
        return self._tensors.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _open_weights(path: Path, stack: ExitStack):
    if path.suffix == ".bin":
        return _TorchFile(path)
    return stack.enter_context(safe_open(str(path), framework="pt"))


def load_hf_model(folder: Path, *, dtype: torch.dtype, device: torch.device) -> tuple[LlamaModel, Tokenizer]:
    folder = Path(folder)
    config = read_hf_config(folder)
    tokenizer = Tokenizer.from_dir(folder, eos_token_ids=config.eos_token_ids)
    files = _weight_files(folder)
    model = LlamaModel(config, dtype=dtype, device=device)
    with ExitStack() as stack:
        try:
            handles = {path: _open_weights(path, stack) for path in set(files.values())}
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"corrupt safetensors file in {folder}: {exc}") from None
        located = {name: handles[path] for name, path in files.items() if not name.startswith("#")}
        for handle in handles.values():
            for name in handle.keys():
                located.setdefault(name, handle)

        def get_tensor(name: str) -> torch.Tensor | None:
            handle = located.get(name)
            if handle is None:
                return None
            try:
                return handle.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise ModelError(f"corrupt tensor {name!r} in {folder}: {exc}") from None

        load_hf_weights(model, get_tensor, located.keys())
    return model, tokenizer


def write_hf_model(folder: Path, model: LlamaModel, tokenizer: Tokenizer) -> None:
    """Write ``model`` as a HF folder transformers loads (sharded above 2 GiB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    raw = config.to_hf_dict()
    raw["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    write_json(folder / "config.json", raw)
    defaults = config.sampling_defaults
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
                  **{key: getattr(defaults, name) for key, (name, _) in _SAMPLING_FIELDS.items()}}
    write_json(folder / "generation_config.json", {k: v for k, v in generation.items() if v is not None and v != []})
    tokenizer.save(folder)
    slices = dict(hf_slices(model))
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in slices.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file_name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        # one shard of copies at a time: safetensors refuses views that share storage
        save_file({name: slices[name].detach().clone() for name in names}, str(folder / file_name),
                  metadata={"format": "pt"})
        weight_map.update({name: file_name for name in names})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in slices.values())
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
