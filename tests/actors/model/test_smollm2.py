"""The default model: our GGUF conversion against transformers loading the same GGUF file."""
from __future__ import annotations

import json

import pytest
import torch
from greedy_compare import assert_same_greedy, transformers_greedy

from fastdecode.actors.model import ModelError, resolve_config
from fastdecode.actors.model.gguf_convert import convert_gguf
from fastdecode.actors.model.loader import smollm2_dir, smollm2_gguf_path
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    ",
]
NUM_GREEDY = 24


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers_gguf(prompt, smollm2_model, smollm2_transformers):
    model, tokenizer = smollm2_model
    hf_model, hf_tokenizer = smollm2_transformers
    prompt_ids = tokenizer.encode(prompt)
    assert prompt_ids == hf_tokenizer(prompt)["input_ids"]
    reference, gaps = transformers_greedy(hf_model, prompt_ids, NUM_GREEDY)
    result = reference_generate(model, tokenizer, prompt_ids,
                                SamplingParams(temperature=0.0, max_tokens=NUM_GREEDY, ignore_eos=True))
    assert_same_greedy(result.token_ids, reference, gaps, label=f"smollm2 {prompt!r}")


@torch.no_grad()
def test_weights_equal_transformers_dequantisation(smollm2_model, smollm2_transformers):
    """Same dequantised values and the Q/K permutation undone the same way."""
    model, _ = smollm2_model
    hf_model, _ = smollm2_transformers
    hf = dict(hf_model.named_parameters())
    layer = model.layers[7]
    q, kv = model.config.q_size, model.config.kv_size
    assert torch.equal(layer.qkv_weight[:q], hf["model.layers.7.self_attn.q_proj.weight"])
    assert torch.equal(layer.qkv_weight[q:q + kv], hf["model.layers.7.self_attn.k_proj.weight"])
    assert torch.equal(layer.down_weight, hf["model.layers.7.mlp.down_proj.weight"])
    assert torch.equal(model.embed_weight, hf["model.embed_tokens.weight"])


def test_generate_continues_sensibly(smollm2_model):
    model, tokenizer = smollm2_model
    result = reference_generate(model, tokenizer, tokenizer.encode("The capital of France is"),
                                SamplingParams(temperature=0.0, max_tokens=8))
    assert "Paris" in result.text


def test_tokenizer_matches_transformers(smollm2_model, smollm2_transformers):
    _, tokenizer = smollm2_model
    _, hf_tokenizer = smollm2_transformers
    for text in ["Hello world!", "  leading spaces and\ttabs\n\nnew lines", "héllo wörld — ünïcode ✓ 日本語",
                 "<|im_start|>user\nhi<|im_end|>", "it's we'll they've"]:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.eos_token_ids == (2,) and tokenizer.bos_token_id == 1


def test_digits_are_split_one_by_one(smollm2_model):
    """llama.cpp's 'smollm' pre-tokenizer (and SmolLM2's own tokenizer.json) split each digit;
    transformers' GGUF loader does not know that pre-tokenizer name, so this is ours only."""
    _, tokenizer = smollm2_model
    ids = tokenizer.encode("in 2024")
    assert [tokenizer.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]


def test_chat_template_matches_transformers(smollm2_model, smollm2_transformers):
    _, tokenizer = smollm2_model
    _, hf_tokenizer = smollm2_transformers
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n")


def test_resolve_config_without_weights(tmp_path, monkeypatch):
    converted = resolve_config("smollm2")
    monkeypatch.setenv("FASTDECODE_CACHE_DIR", str(tmp_path))  # nothing converted there: GGUF metadata only
    from_metadata = resolve_config("smollm2")
    assert list(tmp_path.iterdir()) == []
    for config in (converted, from_metadata):
        assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
        assert config.tie_word_embeddings and config.vocab_size == 49152 and config.eos_token_ids == (2,)
    assert converted == from_metadata


def test_cached_conversion_is_a_hf_folder(smollm2_model):
    folder = smollm2_dir()
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json", "generation_config.json"}
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    from fastdecode.actors.model import gguf_convert

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_convert, "gguf_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(smollm2_gguf_path(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_gguf_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="GGUF"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
