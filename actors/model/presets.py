"""Named model shapes for ``random:<preset>`` models (real shapes, random weights)."""
from __future__ import annotations

from fastdecode.actors.model.config import Llama3RopeScaling, ModelConfig
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.synthetic_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, NUM_TEXT_TOKENS

_LLAMA31_ROPE = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_SPECIALS = {"bos_token_id": BOS_TOKEN_ID, "eos_token_ids": (EOS_TOKEN_ID,)}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=NUM_TEXT_TOKENS + 2, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, **_SPECIALS,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, **_SPECIALS,
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, **_SPECIALS,
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, **_SPECIALS,
    ),
    "qwen2-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, architecture="Qwen2ForCausalLM",
        **_SPECIALS,
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, architecture="Qwen3ForCausalLM", **_SPECIALS,
    ),
    # Qwen3's layout at tiny's size: q/k norms, heads wider than hidden/heads (as Qwen3-0.6B's), a tied head
    "tiny-qwen3": ModelConfig(
        vocab_size=NUM_TEXT_TOKENS + 2, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, architecture="Qwen3ForCausalLM",
        **_SPECIALS,
    ),
}


def preset_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown random preset {name!r}; known: {', '.join(PRESETS)}") from None
