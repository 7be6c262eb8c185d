"""The numbers of a model the scheduler's cost formulas need, and nothing else."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-family decoder.

    ``num_params``, ``weight_bytes`` and ``kv_bytes_per_token`` (K and V, all
    layers) are given, not derived, so a caller can pass a model config's own
    figures; ``ModelShape.llama`` derives them for a plain Llama layout.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in (
            "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
            "vocab_size", "num_params", "weight_bytes", "kv_bytes_per_token", "dtype_bytes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_params <= self.embedding_params:
            raise ValueError("num_params must exceed the embedding table's parameters")

    @classmethod
    def llama(
        cls, *, num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
        vocab_size: int, head_dim: int | None = None, tie_word_embeddings: bool = False, dtype_bytes: int = 2,
    ) -> ModelShape:
        """A Llama layout: attention (q, k, v, o), gated MLP, two RMSNorms per layer, final norm."""
        head_dim = head_dim or hidden_size // num_heads
        attention = hidden_size * head_dim * (2 * num_heads + 2 * num_kv_heads)
        per_layer = attention + 3 * hidden_size * intermediate_size + 2 * hidden_size
        embeddings = vocab_size * hidden_size * (1 if tie_word_embeddings else 2)
        num_params = num_layers * per_layer + embeddings + hidden_size
        return cls(
            num_layers=num_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings, num_params=num_params,
            weight_bytes=num_params * dtype_bytes,
            kv_bytes_per_token=2 * num_layers * num_kv_heads * head_dim * dtype_bytes,
            dtype_bytes=dtype_bytes,
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def dense_params(self) -> int:
        """Parameters each token multiplies with (layers and LM head; an untied input embedding is a lookup)."""
        return self.num_params - (0 if self.tie_word_embeddings else self.embedding_params)

    @property
    def dense_weight_bytes(self) -> int:
        """Weight bytes one dense pass reads."""
        return self.weight_bytes - (0 if self.tie_word_embeddings else self.embedding_params * self.dtype_bytes)

    @property
    def kv_read_bytes_per_token_layer(self) -> float:
        """KV bytes one attend call (one layer) reads per token of context."""
        return self.kv_bytes_per_token / self.num_layers

    @property
    def wire_bytes_per_token_layer(self) -> int:
        """Bytes between GPU and shard per sequence and layer: q, k, v out and o back."""
        return (2 * self.num_heads + 2 * self.num_kv_heads) * self.head_dim * self.dtype_bytes


LLAMA3_8B = ModelShape.llama(
    num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=128256
)
LLAMA3_70B = ModelShape.llama(
    num_layers=80, hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8, vocab_size=128256
)
