"""``ModelConfig``: the shape of a Llama-family model, parsed from a HF ``config.json``.

Supported: Llama 2/3/3.1 (``rope_scaling`` type ``llama3``), Mistral (without an
active sliding window), Qwen2 (qkv bias), Qwen3 dense (a per-head RMSNorm on q and k), SmolLM2, in
float16/bfloat16/float32.  Anything else (quantized checkpoints and mixture-of-experts models included) is
refused with a ``ModelError`` naming the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.request import RequestError, SamplingParams

# HF architecture name -> (model_type, has qkv bias, has q/k norm)
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
_ARCH_BY_MODEL_TYPE = {model_type: arch for arch, (model_type, _, _) in ARCHITECTURES.items()}


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling values the model's creator recommends (``generation_config.json``), used for the fields a
    request leaves out, as vLLM does with its default ``--generation-config auto``.  None: not given.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    max_tokens: int | None = None  # HF's max_new_tokens: the default output limit

    def __post_init__(self) -> None:
        # the fields a request takes are checked by SamplingParams itself: a default it would refuse would
        # fail every request that leaves the field out
        try:
            SamplingParams(**self.sampling_fields())
        except RequestError as exc:
            raise ModelError(f"generation config {exc}") from None
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ModelError(f"generation config max_new_tokens must be a positive integer, got {self.max_tokens!r}")

    def sampling_fields(self) -> dict[str, Any]:
        """The ``SamplingParams`` fields these defaults set (max_tokens, the output limit, left out)."""
        return {name: getattr(self, name) for name in _SAMPLING_FIELDS if getattr(self, name) is not None}

    def describe(self) -> str:
        """``name=value`` of every default that applies, for the start-up log; empty when none."""
        names = (*_SAMPLING_FIELDS, "max_tokens")
        return ", ".join(f"{name}={getattr(self, name)}" for name in names if getattr(self, name) is not None)


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not (self.factor >= 1.0 and self.low_freq_factor > 0 and self.high_freq_factor > self.low_freq_factor):
            raise ModelError(
                "rope_scaling llama3 needs factor >= 1 and high_freq_factor > low_freq_factor > 0, "
                f"got factor={self.factor} low={self.low_freq_factor} high={self.high_freq_factor}"
            )
        if self.original_max_position_embeddings < 1:
            raise ModelError("rope_scaling llama3 needs a positive original_max_position_embeddings")

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family decoder.  Validated on construction."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)  # generation_config.json

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"config {name} must be a positive integer, got {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise ModelError(f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ModelError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelError(f"rope_theta must be positive, got {self.rope_theta}")
        for token_id in (*self.eos_token_ids, *(() if self.bos_token_id is None else (self.bos_token_id,))):
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise ModelError(f"special token id {token_id!r} is outside the vocabulary (size {self.vocab_size})")

    # ----- derived sizes -------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture][0]

    @property
    def has_qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each head of q and of k, before RoPE (the architecture's, never a choice: a
        Qwen3 without them would be another model under the same name)."""
        return ARCHITECTURES[self.architecture][2]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V cache one token occupies over all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    @property
    def num_params(self) -> int:
        hidden = self.hidden_size
        per_layer = (
            hidden * (self.q_size + 2 * self.kv_size)  # qkv
            + (self.q_size + 2 * self.kv_size if self.qkv_bias else 0)
            + (2 * self.head_dim if self.has_qk_norm else 0)  # q and k norms
            + self.q_size * hidden  # o
            + 3 * hidden * self.intermediate_size  # gate, up, down
            + 2 * hidden  # two norms
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * hidden
        return self.vocab_size * hidden + self.num_layers * per_layer + hidden + head

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.num_params * dtype_bytes

    # ----- HF config.json -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Parse a HF ``config.json`` dict; refuse what this model code cannot run."""
        if not isinstance(raw, dict):
            raise ModelError("config.json must hold a JSON object")
        architecture = _architecture_of(raw)
        model_type, qkv_bias, _ = ARCHITECTURES[architecture]
        _refuse_unsupported(raw, model_type)
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            head_dim = raw.get("head_dim") or hidden // num_heads
            rope_theta, rope_scaling = _parse_rope(raw)
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                architecture=architecture,
                bos_token_id=_optional_int(raw.get("bos_token_id")),
                eos_token_ids=_token_ids(raw.get("eos_token_id")),
            )
        except KeyError as exc:
            raise ModelError(f"config.json lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"config.json has a malformed field: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers and ``from_hf_dict`` both read back."""
        raw: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.model_type in ("llama", "qwen3"):
            raw.update(attention_bias=False, mlp_bias=False)
        if self.model_type in ("mistral", "qwen2", "qwen3"):
            raw["sliding_window"] = None
        if self.model_type in ("qwen2", "qwen3"):
            raw["use_sliding_window"] = False
        if self.bos_token_id is not None:
            raw["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            raw["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        return raw


def _architecture_of(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    for name in architectures:
        if name in ARCHITECTURES:
            return name
    if architectures:
        raise ModelError(f"unsupported architecture {architectures[0]!r}{_moe_note(architectures[0])}; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    model_type = raw.get("model_type")
    if model_type in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[model_type]
    raise ModelError(f"unsupported model_type {model_type!r}{_moe_note(model_type)}; "
                     f"supported: {', '.join(_ARCH_BY_MODEL_TYPE)}")


def _moe_note(name: Any) -> str:
    """Why a mixture-of-experts name (Qwen3MoeForCausalLM, qwen3_moe, ...) is refused: its dense sibling may
    run, so the error says the experts are what is missing."""
    return " (mixture-of-experts models are not supported)" if "moe" in str(name).lower() else ""


def _refuse_unsupported(raw: dict[str, Any], model_type: str) -> None:
    # compressed-tensors checkpoints written before transformers 4.45 say "compression_config"
    for key in ("quantization_config", "compression_config"):
        quant = raw.get(key)
        if quant is not None:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise ModelError(
                f"unsupported config: a quantized checkpoint ({key} with quant_method {method!r}); "
                "only float16/bfloat16/float32 checkpoints are supported"
            )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"unsupported hidden_act {act!r}; only silu is supported")
    if model_type in ("llama", "qwen3") and raw.get("attention_bias"):
        raise ModelError(f"unsupported config: attention_bias=true (biases on q/k/v/o) for a {model_type} model")
    if raw.get("mlp_bias"):
        raise ModelError("unsupported config: mlp_bias=true")
    window = raw.get("sliding_window")
    max_pos = raw.get("max_position_embeddings", 2048)
    if model_type in ("qwen2", "qwen3"):
        if raw.get("use_sliding_window") and window and _has_window_layers(raw):
            raise ModelError(f"unsupported config: an active sliding window ({window} tokens)")
    elif window is not None and int(window) < int(max_pos):
        raise ModelError(
            f"unsupported config: an active sliding window ({window} tokens < context {max_pos}); "
            "set sliding_window to null to run it with full attention"
        )
    partial = raw.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ModelError(f"unsupported config: partial_rotary_factor={partial}")


def _has_window_layers(raw: dict[str, Any]) -> bool:
    """Whether a Qwen2/Qwen3 config with ``use_sliding_window`` puts a layer under the window: transformers follows
    ``layer_types`` where the file has it (transformers 5 writes it), else windows the layers from
    ``max_window_layers`` on."""
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list):
        return "sliding_attention" in layer_types
    return int(raw.get("max_window_layers", 0)) < int(raw.get("num_hidden_layers", 0))


def _parse_rope(raw: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE's theta and scaling, read as transformers reads them. 4.x writes rope_theta + rope_scaling; 5.x writes
    rope_parameters, which may lack the theta (then the top-level one). A rope_scaling beside it (added by hand, as
    guides say) replaces it whole, theta included (its own, else the top-level one, else 10000): mixing the two
    fields, or reading one of them only, gave other RoPE values than transformers' without a word."""
    scaling, params = raw.get("rope_scaling"), raw.get("rope_parameters")
    source = scaling if isinstance(scaling, dict) else params if isinstance(params, dict) else {}
    theta = float(source.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = source.get("rope_type", source.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ModelError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
    return theta, Llama3RopeScaling(
        factor=float(source["factor"]),
        low_freq_factor=float(source["low_freq_factor"]),
        high_freq_factor=float(source["high_freq_factor"]),
        original_max_position_embeddings=int(source["original_max_position_embeddings"]),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
