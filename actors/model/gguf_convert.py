"""Converting a llama-architecture GGUF file into a Hugging Face model folder.

Weights are dequantised with the ``gguf`` package's own reference code
(``gguf.quants.dequantize``) to float32, and llama.cpp's row permutation of the
Q and K projections (done for its interleaved RoPE) is undone.  The tokenizer is
rebuilt from the GGUF metadata as a byte-level BPE ``tokenizer.json``.  The
folder is written under a temporary name and renamed, so a crash never leaves
half a model behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fastdecode.actors.model.config import ModelConfig
from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.jsonfile import write_json

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp pre-tokenizer names whose split is "each digit alone, then GPT-2's regex"
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell"}


def open_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise ModelError(f"corrupt GGUF file {path}: {exc}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: Any) -> ModelConfig:
    """The model's config from GGUF metadata alone (no tensor is read)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"unsupported GGUF architecture {arch!r}; only llama is supported")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ModelError("unsupported GGUF: rope scaling (rope_freqs) is not supported for GGUF models")
    try:
        num_heads = int(_field(reader, "llama.attention.head_count"))
        hidden = int(_field(reader, "llama.embedding_length"))
        tokens = reader.fields["tokenizer.ggml.tokens"]
        eos = _field(reader, "tokenizer.ggml.eos_token_id")
        bos = _field(reader, "tokenizer.ggml.bos_token_id")
        return ModelConfig(
            vocab_size=int(_field(reader, "llama.vocab_size", len(tokens.data))),
            hidden_size=hidden,
            intermediate_size=int(_field(reader, "llama.feed_forward_length")),
            num_layers=int(_field(reader, "llama.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", num_heads)),
            head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // num_heads)),
            max_position_embeddings=int(_field(reader, "llama.context_length")),
            rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
            rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=() if eos is None else (int(eos),),
        )
    except (KeyError, TypeError) as exc:
        raise ModelError(f"GGUF metadata lacks or garbles {exc}") from None


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the rotary halves in Q/K rows."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def gguf_tensors(reader: Any, config: ModelConfig) -> dict[str, np.ndarray]:
    """All weights as float32 numpy arrays under HF names, Q/K rows un-permuted."""
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise ModelError(f"unexpected tensor {tensor.name!r} in the GGUF file")
        array = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if name.endswith("q_proj.weight"):
            array = _unpermute_rows(array, config.num_heads)
        elif name.endswith("k_proj.weight"):
            array = _unpermute_rows(array, config.num_kv_heads)
        tensors[name] = np.ascontiguousarray(array)
    return tensors


def gguf_tokenizer(reader: Any) -> Any:
    """A ``Tokenizer`` rebuilt from the GGUF's byte-level BPE metadata."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    from fastdecode.actors.model.tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"unsupported GGUF tokenizer {kind!r}; only byte-level BPE (gpt2) is supported")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelError("corrupt GGUF tokenizer: duplicate tokens in the vocabulary")
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        backend.pre_tokenizer = byte_level
    else:
        raise ModelError(f"unsupported GGUF pre-tokenizer {pre!r}")
    backend.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 = control (special), 4 = user-defined (matched whole, not special)
    typed = list(zip(tokens, token_types))
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in typed if kind == 4])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in typed if kind == 3])
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return Tokenizer(
        backend,
        bos_token=None if bos_id is None else tokens[bos_id],
        eos_token=None if eos_id is None else tokens[eos_id],
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=add_bos,
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write ``gguf_path`` as a HF folder at ``out_dir`` (atomically; no-op if it exists); ``OSError`` if it
    cannot write there (a read-only folder, a full disk)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.is_dir():
        return
    reader = open_gguf(gguf_path)
    config = config_from_gguf(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_json(staging / "config.json", config.to_hf_dict())
        write_json(staging / "generation_config.json",
                   {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)})
        gguf_tokenizer(reader).save(staging)
        try:
            save_file(gguf_tensors(reader, config), str(staging / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors
            raise OSError(f"cannot write {staging / 'model.safetensors'}: {exc}") from None
        try:
            os.rename(staging, out_dir)
        except OSError:
            if not out_dir.is_dir():  # not a concurrent converter that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
