"""The Llama-family decoder, split per layer into the dense part and a hole for attention.

All methods work on a flat ragged token layout: N tokens from any number of
sequences at once, each with its own position.  Attention itself is not here:
the caller gets q, k, v from ``pre_attention`` (RoPE applied), runs attention
wherever the KV-cache lives, and hands the result ``o`` to ``post_attention``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.actors.model.config import ModelConfig
from fastdecode.actors.model.rope import apply_rope, rope_table

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled by ``weight`` in the model dtype (as HF does)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _project_qkv(h: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                 q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float, head_shapes: tuple[int, int, int]):
    """The fused QKV projection of normed ``h``, RoPE applied to q and k: q[N,Hq,D], k, v[N,Hkv,D].
    With ``q_norm``/``k_norm`` (Qwen3; None otherwise) each head of q and of k is RMS-normed over its
    ``D`` values before RoPE, as transformers' ``Qwen3Attention`` does."""
    num_heads, num_kv_heads, head_dim = head_shapes
    qkv = F.linear(h, qkv_weight, qkv_bias)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(-1, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(-1, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(-1, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _pre_attention(x: torch.Tensor, positions: torch.Tensor, input_norm: torch.Tensor, qkv_weight: torch.Tensor,
                   qkv_bias: torch.Tensor | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                   rope_cos: torch.Tensor, rope_sin: torch.Tensor, eps: float,
                   head_shapes: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's input norm, fused QKV projection, q/k norms and RoPE (a pure function of its tensors)."""
    return _project_qkv(rms_norm(x, input_norm, eps), qkv_weight, qkv_bias, q_norm, k_norm, rope_cos[positions],
                        rope_sin[positions], eps, head_shapes)


def _post_attention(x: torch.Tensor, o: torch.Tensor, o_weight: torch.Tensor, post_norm: torch.Tensor,
                    gate_up_weight: torch.Tensor, down_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One layer's O-projection with its residual, post norm and SwiGLU MLP with its residual."""
    x = _residual(x, F.linear(o.reshape(o.shape[0], -1), o_weight))
    h = rms_norm(x, post_norm, eps)
    gate, up = F.linear(h, gate_up_weight).chunk(2, dim=-1)
    return _residual(x, F.linear(F.silu(gate) * up, down_weight))


def _residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y``, spelled in float32: the same values (a bf16 add rounds its float32 sum once too), but
    torch.compile then fuses it into the next norm's kernel instead of making the matrix product an
    add-into-a-copy of ``x`` (a device copy of ``x`` and a GEMM epilogue per residual on the H100)."""
    return (x.float() + y.float()).to(x.dtype)


def _step_first(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_norm: torch.Tensor,
                qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, q_norm: torch.Tensor | None,
                k_norm: torch.Tensor | None, eps: float, head_shapes: tuple[int, int, int], kv_rows: torch.Tensor,
                write_index: torch.Tensor) -> torch.Tensor:
    """The first layer's dense part of a decode step: q, with the new k and v written into a KV pool.
    ``cos``/``sin`` are the rows' RoPE values, gathered once per step. ``kv_rows`` is the layer's pool seen
    as ``[rows, D]`` and ``write_index`` says where the rows of ``stack((k, v))`` (``[2, N, Hkv, D]`` flat)
    go. Written here, the store is part of the RoPE kernel (compiled, an in-place scatter into the pool)
    instead of a stack and an index_copy of their own per layer. (One buffer for q and kv, written by one
    kernel, was slower on the H100: inductor's kernel for that concatenation took 6.9 µs per layer at 32
    rows against 2 + 2 for two outputs.)"""
    q, k, v = _project_qkv(rms_norm(x, input_norm, eps), qkv_weight, qkv_bias, q_norm, k_norm, cos, sin, eps,
                           head_shapes)
    kv_rows.index_put_((write_index,), torch.stack((k, v)).view(-1, kv_rows.shape[-1]))
    return q


def _step_between(x: torch.Tensor, o: torch.Tensor, o_weight: torch.Tensor, post_norm: torch.Tensor,
                  gate_up_weight: torch.Tensor, down_weight: torch.Tensor, next_norm: torch.Tensor,
                  next_qkv_weight: torch.Tensor, next_qkv_bias: torch.Tensor | None, next_q_norm: torch.Tensor | None,
                  next_k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  head_shapes: tuple[int, int, int], next_kv_rows: torch.Tensor, write_index: torch.Tensor):
    """A layer's post-attention part and the next layer's pre-attention part as one function, so the
    residual add and the next norm fuse: the layer's output x and the next layer's q (its k and v
    written into ``next_kv_rows``, as ``_step_first`` does)."""
    x = _post_attention(x, o, o_weight, post_norm, gate_up_weight, down_weight, eps)
    q = _step_first(x, cos, sin, next_norm, next_qkv_weight, next_qkv_bias, next_q_norm, next_k_norm, eps,
                    head_shapes, next_kv_rows, write_index)
    return x, q


_SEGMENTS = (_pre_attention, _post_attention, _step_first, _step_between)


def has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


class DecoderLayer(nn.Module):
    """One layer's weights, q/k/v and gate/up fused into single matrices (q/k norms: Qwen3 only)."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        hidden, qkv_rows = config.hidden_size, config.q_size + 2 * config.kv_size
        self.input_norm = empty(hidden)
        self.qkv_weight = empty(qkv_rows, hidden)
        self.qkv_bias = empty(qkv_rows) if config.qkv_bias else None
        self.q_norm = empty(config.head_dim) if config.has_qk_norm else None
        self.k_norm = empty(config.head_dim) if config.has_qk_norm else None
        self.o_weight = empty(hidden, config.q_size)
        self.post_norm = empty(hidden)
        self.gate_up_weight = empty(2 * config.intermediate_size, hidden)
        self.down_weight = empty(hidden, config.intermediate_size)


class LlamaModel(nn.Module):
    """Weights and dense computation of a Llama/Mistral/Qwen2/Qwen3/SmolLM2 model.

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
        self._pre, self._post, self._first, self._between = _SEGMENTS
        self._compiled: dict[str, tuple] = {}  # torch.compile backend -> _SEGMENTS compiled, made on first use
        self.is_dense_compiled = False

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
        return self._pre(x, positions, weights.input_norm, weights.qkv_weight, weights.qkv_bias, weights.q_norm,
                         weights.k_norm, self.rope_cos, self.rope_sin, self.config.rms_norm_eps, self._head_shapes)

    def post_attention(self, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x[N, hidden] (the layer's input), o[N,Hq,D] -> the layer's output x[N, hidden]."""
        weights = self.layers[layer]
        return self._post(x, o, weights.o_weight, weights.post_norm, weights.gate_up_weight, weights.down_weight,
                          self.config.rms_norm_eps)

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin ``[N, D]`` of the rows at ``positions`` (the same for every layer)."""
        return self.rope_cos[positions], self.rope_sin[positions]

    def step_first(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_rows: torch.Tensor,
                   write_index: torch.Tensor) -> torch.Tensor:
        """Layer 0's dense part of a decode step: q[N,Hq,D], its k and v stored at ``write_index`` of
        ``kv_rows`` (layer 0's pool as ``[rows, D]``; RoPE from ``rope_at``)."""
        weights = self.layers[0]
        return self._first(x, cos, sin, weights.input_norm, weights.qkv_weight, weights.qkv_bias, weights.q_norm,
                           weights.k_norm, self.config.rms_norm_eps, self._head_shapes, kv_rows, write_index)

    def step_between(self, layer: int, x: torch.Tensor, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     next_kv_rows: torch.Tensor, write_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``post_attention(layer)`` and layer+1's ``step_first`` in one call: (x, q)."""
        weights, following = self.layers[layer], self.layers[layer + 1]
        return self._between(x, o, weights.o_weight, weights.post_norm, weights.gate_up_weight, weights.down_weight,
                             following.input_norm, following.qkv_weight, following.qkv_bias, following.q_norm,
                             following.k_norm, cos, sin, self.config.rms_norm_eps, self._head_shapes, next_kv_rows,
                             write_index)

    def compile_dense(self, is_compiled: bool = True, *, backend: str = "inductor") -> None:
        """Run the per-layer dense segments through ``torch.compile`` (CUDA), or back in eager mode
        with ``is_compiled=False``. Compiled, the norms, RoPE, the SiLU gate and the residual adds
        become a few fused kernels around the matrix products, which is what a decode step's time
        is made of once it replays as a CUDA graph (each small kernel costs microseconds of launch
        there). Every layer shares one compiled function (weights are arguments) and the batch
        dimension is dynamic; compilation happens at the first call of a shape, which the CUDA-graph
        warm-ups make before any capture. Without Triton (a CUDA torch built without it) the
        segments stay eager, with a warning. ``backend`` is torch.compile's (tests trace with
        ``"aot_eager"``, which needs no compiler)."""
        if is_compiled and backend == "inductor" and self.device.type == "cuda" and not has_triton():
            log.warning("torch.compile needs Triton, which is not installed: the dense segments run eagerly")
            is_compiled = False
        if is_compiled and backend not in self._compiled:
            self._compiled[backend] = tuple(torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)
                                            for fn in _SEGMENTS)
        self._pre, self._post, self._first, self._between = self._compiled[backend] if is_compiled else _SEGMENTS
        self.is_dense_compiled = is_compiled

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x[N, hidden] -> float32 logits[N, vocab] (final norm + LM head)."""
        h = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        head = self.embed_weight if self.lm_head_weight is None else self.lm_head_weight
        return F.linear(h, head).float()

    def forward(self, *args: object) -> torch.Tensor:
        raise TypeError("LlamaModel has no single forward: call embed/pre_attention/post_attention/logits")
