"""Quantized or foreign HF checkpoints are refused at load with a named reason, never served as garbage."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdecode.actors.model import ModelError, load_model, resolve_config
from fastdecode.cli.make_random_model import make_random_model


@pytest.fixture(scope="module")
def written_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "tiny"
    make_random_model("tiny", 5, out)
    return out


def _copy_folder(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _load(folder):
    return load_model(str(folder), dtype="float32", device="cpu")


@pytest.mark.parametrize("method", ["fp8", "compressed-tensors", "gptq", "awq", "bitsandbytes"])
def test_a_quantization_config_is_refused_naming_the_method(written_tiny, tmp_path, method):
    folder = _copy_folder(written_tiny, tmp_path / "m")
    _edit_config(folder, quantization_config={"quant_method": method, "bits": 4})
    for attempt in (lambda: _load(folder), lambda: resolve_config(str(folder))):
        with pytest.raises(ModelError, match=f"quant_method '{method}'.*float16/bfloat16/float32") as info:
            attempt()
        assert "\n" not in str(info.value)


def test_a_null_quantization_config_is_no_quantization(written_tiny, tmp_path):
    folder = _copy_folder(written_tiny, tmp_path / "m")
    _edit_config(folder, quantization_config=None)
    _load(folder)


def test_an_fp8_tensor_is_refused_by_dtype(written_tiny, tmp_path):
    """An FP8 checkpoint whose config says nothing: its e4m3 weights must not be cast without their scale."""
    folder = _copy_folder(written_tiny, tmp_path / "m")
    name = "model.layers.0.mlp.down_proj.weight"

    def to_fp8(tensors):
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)

    _edit_tensors(folder, to_fp8)
    with pytest.raises(ModelError, match=f"{name}.*float8_e4m3fn.*float16/bfloat16/float32"):
        _load(folder)


@pytest.mark.parametrize("name, shape", [
    ("model.layers.1.self_attn.q_proj.weight_scale", (1,)),  # a quantized checkpoint's scale
    ("model.layers.2.input_layernorm.weight", (64,)),  # a layer beyond the config's num_hidden_layers
], ids=["weight-scale", "extra-layer"])
def test_an_unknown_layer_tensor_is_refused_and_named(written_tiny, tmp_path, name, shape):
    folder = _copy_folder(written_tiny, tmp_path / "m")
    _edit_tensors(folder, lambda tensors: tensors.update({name: torch.ones(shape)}))
    with pytest.raises(ModelError, match=f"does not use.*{name}"):
        _load(folder)


def test_rotary_inv_freq_and_a_tied_lm_head_are_still_skipped(written_tiny, tmp_path):
    """Older transformers saved ``rotary_emb.inv_freq`` per layer; tied models may still store ``lm_head``."""
    folder = _copy_folder(written_tiny, tmp_path / "m")
    _edit_config(folder, tie_word_embeddings=True)

    def add_extras(tensors):
        for index in range(2):
            tensors[f"model.layers.{index}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    _edit_tensors(folder, add_extras)
    model, _ = _load(folder)
    assert model.config.tie_word_embeddings and model.lm_head_weight is None
    reference = load_file(str(written_tiny / "model.safetensors"))
    assert torch.equal(model.layers[1].down_weight, reference["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_still_load(written_tiny, tmp_path, dtype):
    folder = _copy_folder(written_tiny, tmp_path / "m")
    _edit_tensors(folder, lambda tensors: tensors.update({k: v.to(dtype) for k, v in tensors.items()}))
    model, _ = _load(folder)
    expected = load_file(str(written_tiny / "model.safetensors"))["model.norm.weight"].to(dtype).float()
    assert torch.equal(model.final_norm, expected)


@pytest.mark.parametrize("declared, key, on_gpu", [
    ("float16", "torch_dtype", torch.float16), ("bfloat16", "torch_dtype", torch.bfloat16),
    ("float32", "torch_dtype", torch.bfloat16), ("float16", "dtype", torch.float16), (None, None, torch.bfloat16),
])
def test_auto_dtype_keeps_a_half_checkpoint_half_on_a_gpu(written_tiny, tmp_path, declared, key, on_gpu):
    """vLLM's --dtype auto: a float16 checkpoint serves in float16 on a GPU, others in bfloat16; float32 on a CPU.
    config.json declares it as torch_dtype, or as transformers 5's dtype."""
    from fastdecode.actors.model.loader import model_dtype

    folder = _copy_folder(written_tiny, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    if key is not None:
        config[key] = declared
    (folder / "config.json").write_text(json.dumps(config))
    assert model_dtype(str(folder), "auto", torch.device("cuda")) == on_gpu
    assert model_dtype(str(folder), "auto", torch.device("cpu")) == torch.float32
    assert model_dtype(str(folder), "float16", torch.device("cpu")) == torch.float16
    assert model_dtype("random:tiny", "auto", torch.device("cuda")) == torch.bfloat16
    assert model_dtype("smollm2", "auto", torch.device("cuda")) == torch.bfloat16
