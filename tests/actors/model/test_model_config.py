"""ModelConfig parsing, validation and size helpers; model names without weights."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fastdecode.actors.model import ModelConfig, ModelError, resolve_config
from fastdecode.actors.model.config import Llama3RopeScaling
from fastdecode.actors.model.presets import PRESETS

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "max_window_layers": 28, "sliding_window": 131072,
    "use_sliding_window": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "max_window_layers": 36, "sliding_window": None,
    "use_sliding_window": False, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_llama31_config_parses():
    config = ModelConfig.from_hf_dict(LLAMA31_8B)
    assert config.head_dim == 128 and config.num_kv_heads == 8 and not config.qkv_bias
    assert config.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert config.eos_token_ids == (128001, 128008, 128009) and config.bos_token_id == 128000
    preset = PRESETS["llama3-8b"]
    assert dataclasses.replace(config, bos_token_id=preset.bos_token_id, eos_token_ids=preset.eos_token_ids) == preset


def test_qwen2_config_has_qkv_bias_and_inactive_window():
    config = ModelConfig.from_hf_dict(QWEN2_7B)
    assert config.qkv_bias and config.architecture == "Qwen2ForCausalLM" and config.eos_token_ids == (151643,)


def test_qwen3_config_has_qk_norm_and_matches_the_preset():
    config = ModelConfig.from_hf_dict(QWEN3_8B)
    assert config.has_qk_norm and not config.qkv_bias and config.architecture == "Qwen3ForCausalLM"
    preset = PRESETS["qwen3-8b"]
    assert dataclasses.replace(config, bos_token_id=preset.bos_token_id, eos_token_ids=preset.eos_token_ids) == preset
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    assert not ModelConfig.from_hf_dict(LLAMA31_8B).has_qk_norm


def test_qwen3_moe_and_attention_bias_are_refused():
    moe = {**QWEN3_8B, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128}
    with pytest.raises(ModelError, match="'Qwen3MoeForCausalLM' \\(mixture-of-experts models are not supported\\)"):
        ModelConfig.from_hf_dict(moe)
    with pytest.raises(ModelError, match="'qwen3_moe' \\(mixture-of-experts"):
        ModelConfig.from_hf_dict({k: v for k, v in moe.items() if k != "architectures"})
    with pytest.raises(ModelError, match="attention_bias=true .* qwen3 model"):
        ModelConfig.from_hf_dict({**QWEN3_8B, "attention_bias": True})


def test_transformers5_rope_parameters_form():
    raw = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA31_8B["rope_scaling"]}
    assert ModelConfig.from_hf_dict(raw) == ModelConfig.from_hf_dict(LLAMA31_8B)


def _llama3(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("fields", [
    {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "rope_scaling": _llama3(8.0)},
    {"rope_theta": 500000.0, "rope_parameters": _llama3(8.0)},
    {"rope_parameters": {"rope_theta": 500000.0, **_llama3(8.0)}, "rope_scaling": _llama3(2.0)},
    {"rope_theta": 1000.0, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}},
    {"rope_theta": 1000.0, "rope_scaling": {"rope_theta": 500000.0, **_llama3(8.0)}},
    {"rope_theta": 500000.0, "rope_scaling": _llama3(8.0)},
], ids=["scaling-beside-default-parameters", "parameters-without-theta", "two-llama3-factors",
        "parameters-theta-over-top-level", "scaling-with-its-own-theta", "transformers-4"])
def test_rope_fields_are_read_as_transformers_reads_them(fields):
    """A rope_scaling added beside a transformers-5 rope_parameters, a rope_parameters without its theta, ...: one
    of them was dropped or the two mixed, and the model loaded with other RoPE values than transformers' (wrong
    tokens without a word)."""
    transformers = pytest.importorskip("transformers")
    plain = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    expected = transformers.LlamaConfig(**json.loads(json.dumps({**plain, **fields}))).rope_parameters
    ours = ModelConfig.from_hf_dict({**plain, **fields})
    assert ours.rope_theta == expected["rope_theta"]
    assert (ours.rope_scaling and ours.rope_scaling.factor) == expected.get("factor")


def test_a_rope_scaling_of_another_kind_in_either_field_is_refused():
    plain = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    linear = {"rope_type": "linear", "factor": 2.0}
    for fields in ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "rope_scaling": linear},
                   {"rope_theta": 5e5, "rope_parameters": linear}):
        with pytest.raises(ModelError, match="unsupported rope_scaling type 'linear'"):
            ModelConfig.from_hf_dict({**plain, **fields})


def test_to_hf_dict_round_trips():
    for config in PRESETS.values():
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"eos_token_id": 999999999}, "outside the vocabulary"),
        ({"num_hidden_layers": "many"}, "malformed"),
    ],
)
def test_bad_configs_are_refused_clearly(change, message):
    with pytest.raises(ModelError, match=message) as info:
        ModelConfig.from_hf_dict({**LLAMA31_8B, **change})
    assert "\n" not in str(info.value)


def test_missing_field_is_named():
    raw = dict(LLAMA31_8B)
    del raw["hidden_size"]
    with pytest.raises(ModelError, match="hidden_size"):
        ModelConfig.from_hf_dict(raw)


def test_active_sliding_window_is_refused():
    mistral = {**LLAMA31_8B, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
               "rope_scaling": None, "sliding_window": 4096, "max_position_embeddings": 32768}
    with pytest.raises(ModelError, match="sliding window"):
        ModelConfig.from_hf_dict(mistral)
    assert ModelConfig.from_hf_dict({**mistral, "sliding_window": None}).architecture == "MistralForCausalLM"
    with pytest.raises(ModelError, match="sliding window"):
        ModelConfig.from_hf_dict({**QWEN2_7B, "use_sliding_window": True, "max_window_layers": 20})
    window = {**QWEN3_8B, "use_sliding_window": True, "sliding_window": 4096}
    assert ModelConfig.from_hf_dict(window).has_qk_norm  # max_window_layers = all 36 layers: none is windowed
    with pytest.raises(ModelError, match="sliding window \\(4096 tokens\\)"):
        ModelConfig.from_hf_dict({**window, "max_window_layers": 28})
    # transformers 5 writes layer_types, which it follows instead of max_window_layers
    full, sliding = ["full_attention"] * 36, ["full_attention"] * 28 + ["sliding_attention"] * 8
    assert ModelConfig.from_hf_dict({**window, "max_window_layers": 28, "layer_types": full}).has_qk_norm
    with pytest.raises(ModelError, match="sliding window"):
        ModelConfig.from_hf_dict({**window, "layer_types": sliding})
    assert ModelConfig.from_hf_dict({**QWEN3_8B, "layer_types": sliding}).has_qk_norm  # use_sliding_window false


def test_sizes_of_known_models():
    # published parameter counts: Llama-3.1-8B 8.03B, 70B 70.55B, Qwen2-7B 7.62B, Qwen3-8B 8.19B, SmolLM2-135M 134.5M
    assert round(PRESETS["llama3-8b"].num_params / 1e9, 2) == 8.03
    assert round(PRESETS["llama3-70b"].num_params / 1e9, 2) == 70.55
    assert round(PRESETS["qwen2-7b"].num_params / 1e9, 2) == 7.62
    assert round(PRESETS["qwen3-8b"].num_params / 1e9, 2) == 8.19
    assert round(PRESETS["smollm2-135m"].num_params / 1e6, 1) == 134.5
    assert PRESETS["llama3-8b"].kv_bytes_per_token(2) == 128 * 1024  # DESIGN.md: 128 KiB per token
    assert PRESETS["llama3-8b"].weight_bytes(2) == 2 * PRESETS["llama3-8b"].num_params


def test_presets_match_their_documented_shapes():
    tiny = PRESETS["tiny"]
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_heads, tiny.num_kv_heads) == (2, 64, 4, 2)
    assert tiny.vocab_size >= 256 and tiny.max_position_embeddings >= 2048
    assert PRESETS["qwen2-7b"].qkv_bias and PRESETS["smollm2-135m"].tie_word_embeddings


def test_resolve_config_by_name(tmp_path):
    assert resolve_config("random:llama3-70b") is PRESETS["llama3-70b"]
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_7B))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}))
    assert resolve_config(str(tmp_path)).eos_token_ids == (151643, 151645)
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        resolve_config("no-such-model")
    with pytest.raises(ModelError, match="unknown random preset 'huge'"):
        resolve_config("random:huge")
