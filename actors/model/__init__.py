"""The Llama-family model: config, dense part, plain-torch attention part, sources.

What the Executor and the CLI use::

    model, tokenizer = load_model("smollm2", dtype="auto", device="auto", seed=0)
    x = model.embed(token_ids)
    q, k, v = model.pre_attention(layer, x, positions)
    x = model.post_attention(layer, x, o)
    logits = model.logits(x)
"""
from fastdecode.actors.model.attention import TorchKVCache, prefill_attention, prefill_attention_ragged
from fastdecode.actors.model.config import ModelConfig
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.llama import LlamaModel
from fastdecode.actors.model.loader import load_model, resolve_config, resolve_device, resolve_dtype
from fastdecode.actors.model.tokenizer import Tokenizer

__all__ = [
    "LlamaModel",
    "ModelConfig",
    "ModelError",
    "Tokenizer",
    "TorchKVCache",
    "load_model",
    "prefill_attention",
    "prefill_attention_ragged",
    "resolve_config",
    "resolve_device",
    "resolve_dtype",
]
