"""The Llama-family decoder, split per layer into the dense part and a hole for attention.

All methods work on a flat ragged token layout: N tokens from any number of
sequences at once, each with its own position.  Attention itself is not here:
the caller gets q, k, v from ``pre_attention`` (RoPE applied), runs attention
wherever the KV-cache lives, and hands the result ``o`` to ``post_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.actors.model.config import ModelConfig
from fastdecode.actors.model.rope import apply_rope, rope_table


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled by ``weight`` in the model dtype (as HF does)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    """One layer's weights, q/k/v and gate/up fused into single matrices."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        hidden, qkv_rows = config.hidden_size, config.q_size + 2 * config.kv_size
        self.input_norm = empty(hidden)
        self.qkv_weight = empty(qkv_rows, hidden)
        self.qkv_bias = empty(qkv_rows) if config.qkv_bias else None
        self.o_weight = empty(hidden, config.q_size)
        self.post_norm = empty(hidden)
        self.gate_up_weight = empty(2 * config.intermediate_size, hidden)
        self.down_weight = empty(hidden, config.intermediate_size)


class LlamaModel(nn.Module):
    """Weights and dense computation of a Llama/Mistral/Qwen2/SmolLM2 model.

    Parameters are allocated uninitialised in ``dtype`` on ``device``; a source
    (``actors.model.weights``) fills them.
    """

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.embed_weight = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.layers = nn.ModuleList(DecoderLayer(config, dtype=dtype, device=device) for _ in range(config.num_layers))
        self.final_norm = nn.Parameter(torch.empty(config.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.lm_head_weight = (
            None
            if config.tie_word_embeddings
            else nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype, device=device),
                              requires_grad=False)
        )
        cos, sin = rope_table(config, dtype=dtype, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._head_shapes = (config.num_heads, config.num_kv_heads, config.head_dim)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    # ----- the four calls the engines make ---------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor[N] -> x[N, hidden]."""
        return F.embedding(token_ids, self.embed_weight)

    def pre_attention(
        self, layer: int, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[N, hidden], positions LongTensor[N] -> q[N,Hq,D], k[N,Hkv,D], v[N,Hkv,D], RoPE applied."""
        weights = self.layers[layer]
        num_heads, num_kv_heads, head_dim = self._head_shapes
        h = rms_norm(x, weights.input_norm, self.config.rms_norm_eps)
        qkv = F.linear(h, weights.qkv_weight, weights.qkv_bias)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].view(-1, num_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, num_kv_heads, head_dim)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def post_attention(self, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x[N, hidden] (the layer's input), o[N,Hq,D] -> the layer's output x[N, hidden]."""
        weights = self.layers[layer]
        x = x + F.linear(o.reshape(o.shape[0], -1), weights.o_weight)
        h = rms_norm(x, weights.post_norm, self.config.rms_norm_eps)
        gate, up = F.linear(h, weights.gate_up_weight).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, weights.down_weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x[N, hidden] -> float32 logits[N, vocab] (final norm + LM head)."""
        h = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        head = self.embed_weight if self.lm_head_weight is None else self.lm_head_weight
        return F.linear(h, head).float()

    def forward(self, *args: object) -> torch.Tensor:
        raise TypeError("LlamaModel has no single forward: call embed/pre_attention/post_attention/logits")
