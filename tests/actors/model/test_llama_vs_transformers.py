"""Our dense/attention split against transformers, float32 on the CPU, random weights.

Three shapes: Llama-style (GQA, untied head), Qwen2-style (qkv bias, tied
embeddings, one KV head) and Llama 3.1 ``rope_scaling`` (positions far past the
original context so the scaling matters).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from greedy_compare import assert_same_greedy, transformers_greedy

from fastdecode.actors.model import LlamaModel, ModelConfig, TorchKVCache, prefill_attention
from fastdecode.actors.model.config import Llama3RopeScaling
from fastdecode.actors.model.weights import hf_state_dict, init_random_weights
from fastdecode.actors.reference import reference_generate, run_tokens
from fastdecode.actors.request import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, head_dim=16)
CONFIGS = {
    "llama": ModelConfig(**_COMMON, num_kv_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                         eos_token_ids=(2,)),
    "qwen2": ModelConfig(**_COMMON, num_kv_heads=1, max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6,
                         qkv_bias=True, tie_word_embeddings=True, architecture="Qwen2ForCausalLM", eos_token_ids=(2,)),
    "llama3-rope": ModelConfig(**_COMMON, num_kv_heads=2, max_position_embeddings=4096, rope_theta=500000.0,
                               rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 64), eos_token_ids=(2,)),
}
NUM_PROMPT = 40
NUM_GREEDY = 32


class _NoTokenizer:
    eos_token_ids = (2,)

    def decode(self, token_ids, *, skip_special_tokens=True):
        return "".join(chr(0x41 + t % 26) for t in token_ids)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    """(name, our model, the transformers model with the same weights)."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]
    ours = LlamaModel(config, dtype=torch.float32, device="cpu")
    init_random_weights(ours, seed=11)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    result = theirs.load_state_dict(hf_state_dict(ours), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return request.param, ours, theirs


def _prompt(config: ModelConfig) -> list[int]:
    generator = torch.Generator().manual_seed(5)
    return torch.randint(3, config.vocab_size, (NUM_PROMPT,), generator=generator).tolist()


def _our_prompt_logits(model: LlamaModel, prompt: list[int]) -> torch.Tensor:
    cache = TorchKVCache.for_model(model)
    cache.allocate(0)
    return model.logits(run_tokens(model, cache, 0, prompt, 0))


@torch.no_grad()
def test_prompt_logits_match_transformers(pair):
    name, ours, theirs = pair
    prompt = _prompt(ours.config)
    expected = theirs(torch.tensor([prompt])).logits[0]
    got = _our_prompt_logits(ours, prompt)
    diff = (got - expected).abs().max().item()
    print(f"{name}: prompt logits max abs diff {diff:.2e} over {len(prompt)} positions")
    assert diff <= 1e-4
    assert expected.std() > 0.3, "logits this flat would make the comparison meaningless"


@torch.no_grad()
def test_far_positions_match_transformers(pair):
    """Positions 3000+ (past llama3's original 64-token context): RoPE scaling must agree."""
    name, ours, theirs = pair
    if ours.config.max_position_embeddings < 4096:
        pytest.skip("short-context config")
    prompt = _prompt(ours.config)[:16]
    positions = torch.arange(3000, 3000 + len(prompt))
    expected = theirs(torch.tensor([prompt]), position_ids=positions[None]).logits[0]
    x = ours.embed(torch.tensor(prompt))
    for layer in range(ours.num_layers):
        q, k, v = ours.pre_attention(layer, x, positions)
        x = ours.post_attention(layer, x, prefill_attention(q, k, v))
    diff = (ours.logits(x) - expected).abs().max().item()
    print(f"{name}: far-position logits max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_greedy_tokens_match_transformers(pair):
    name, ours, theirs = pair
    prompt = _prompt(ours.config)
    reference, gaps = transformers_greedy(theirs, prompt, NUM_GREEDY)
    result = reference_generate(ours, _NoTokenizer(), prompt,
                                SamplingParams(temperature=0.0, max_tokens=NUM_GREEDY, ignore_eos=True))
    assert len(result.token_ids) == NUM_GREEDY and result.finish_reason == "length"
    assert_same_greedy(result.token_ids, reference, gaps, label=name)


@torch.no_grad()
def test_comparison_catches_a_wrong_rope_scaling(pair):
    """The same weights without the llama3 scaling must differ well beyond 1e-4 (the test can fail)."""
    name, ours, theirs = pair
    if ours.config.rope_scaling is None:
        pytest.skip("no scaling to break")
    unscaled = LlamaModel(dataclasses.replace(ours.config, rope_scaling=None), dtype=torch.float32, device="cpu")
    unscaled.load_state_dict(ours.state_dict())
    prompt = _prompt(ours.config)
    diff = (_our_prompt_logits(unscaled, prompt) - _our_prompt_logits(ours, prompt)).abs().max().item()
    assert diff > 1e-2
