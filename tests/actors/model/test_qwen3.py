"""Qwen3 (dense) against transformers, float32 on the CPU: a folder transformers writes loads and gives its
logits and greedy tokens, through the single-process reference and through a KVShard's native attention;
``random:tiny-qwen3`` written by make-random-model is what transformers and our loader read back."""
from __future__ import annotations

import math

import pytest
import torch
from greedy_compare import assert_same_greedy, transformers_greedy

from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.model import TorchKVCache, load_model
from fastdecode.actors.model.presets import PRESETS
from fastdecode.actors.reference import reference_generate, run_tokens
from fastdecode.actors.request import SamplingParams
from fastdecode.cli.make_random_model import make_random_model

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SEED = 5
NUM_GREEDY = 24
TEXT = "The capital of France is Paris, and the capital of Italy is"
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_GREEDY, ignore_eos=True)


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory, tiny_model):
    """A Qwen3 made and saved by transformers (head_dim 32 while hidden/heads is 16, GQA, untied head) with the
    synthetic tokenizer beside it: ``(folder, the transformers model)``."""
    _, tokenizer = tiny_model
    hf_config = transformers.Qwen3Config(
        vocab_size=PRESETS["tiny"].vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_ids[0],
    )
    torch.manual_seed(SEED)
    model = transformers.Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # transformers' init (std 0.02, norms 1) gives flat logits and leaves q/k norms inert
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    folder = tmp_path_factory.mktemp("models") / "qwen3"
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder, model


def _prompt(tokenizer) -> list[int]:
    return tokenizer.encode(TEXT)


def test_config_written_by_transformers_parses(transformers_folder):
    folder, _ = transformers_folder
    config = load_model(str(folder), dtype="float32", device="cpu")[0].config
    assert config.architecture == "Qwen3ForCausalLM" and config.has_qk_norm and not config.qkv_bias
    assert (config.head_dim, config.q_size, config.hidden_size) == (32, 128, 64)


@torch.no_grad()
def test_prompt_logits_match_transformers(transformers_folder):
    folder, theirs = transformers_folder
    ours, tokenizer = load_model(str(folder), dtype="float32", device="cpu")
    prompt = _prompt(tokenizer)
    expected = theirs(torch.tensor([prompt])).logits[0]
    cache = TorchKVCache.for_model(ours)
    cache.allocate(0)
    got = ours.logits(run_tokens(ours, cache, 0, prompt, 0))
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.std() > 0.3, "logits this flat would make the comparison meaningless"


def test_greedy_tokens_match_transformers(transformers_folder):
    folder, theirs = transformers_folder
    ours, tokenizer = load_model(str(folder), dtype="float32", device="cpu")
    prompt = _prompt(tokenizer)
    reference, gaps = transformers_greedy(theirs, prompt, NUM_GREEDY)
    result = reference_generate(ours, tokenizer, prompt, GREEDY)
    assert_same_greedy(result.token_ids, reference, gaps, label="qwen3 reference")


async def test_greedy_tokens_through_a_shard_match_transformers(transformers_folder, tiny_model):
    """num_shards=1: attention runs in a KVShard's native code on the q and k the Qwen3 norms made."""
    folder, theirs = transformers_folder
    prompt = _prompt(tiny_model[1])
    reference, gaps = transformers_greedy(theirs, prompt, NUM_GREEDY)
    config = ClusterConfig(model=str(folder), dtype="float32", device="cpu", num_shards=1,
                           shard_kv_memory_bytes=16 << 20)
    async with await Cluster.start(config) as cluster:
        tokens = [event.token_id async for event in cluster.submit(prompt, GREEDY) if event.token_id >= 0]
    assert_same_greedy(tokens, reference, gaps, label="qwen3 one shard")


def test_make_random_model_folder_round_trips_and_transformers_agrees(tmp_path):
    out = tmp_path / "tiny-qwen3"
    make_random_model("tiny-qwen3", SEED, out)
    ours, tokenizer = load_model("random:tiny-qwen3", dtype="float32", device="cpu", seed=SEED)
    back, _ = load_model(str(out), dtype="float32", device="cpu")
    assert back.config == ours.config and ours.config.has_qk_norm
    assert all(torch.equal(x, y) for x, y in zip(ours.parameters(), back.parameters()))
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                                     output_loading_info=True)
    assert isinstance(theirs, transformers.Qwen3ForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(theirs.model.layers[1].self_attn.k_norm.weight, ours.layers[1].k_norm)
    prompt = _prompt(tokenizer)
    reference, gaps = transformers_greedy(theirs.eval(), prompt, NUM_GREEDY)
    result = reference_generate(ours, tokenizer, prompt, GREEDY)
    assert_same_greedy(result.token_ids, reference, gaps, label="tiny-qwen3")
