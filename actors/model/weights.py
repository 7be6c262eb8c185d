"""Filling a ``LlamaModel``'s parameters: from HF-named tensors, or seeded random.

HF checkpoints keep q/k/v and gate/up as separate matrices; the model fuses
them, so loading copies each into its slice and exporting splits them again.
Loading refuses what it cannot run faithfully: a tensor in a dtype other than
float16/bfloat16/float32 (FP8 and integer weights need scales this code never
applies) and a tensor under ``model.layers.`` the model has no slot for (a
quantization scale, a zero point, another architecture's weights).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator

import torch

from fastdecode.actors.model.errors import ModelError
from fastdecode.actors.model.llama import LlamaModel

# elements of float32 scratch per random-generation chunk (64 MiB)
_RANDOM_CHUNK_ELEMENTS = 1 << 24
CHECKPOINT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# layer tensors some checkpoints hold that the model computes itself: skipped, not refused
# (transformers before 4.31 saved the RoPE frequencies of every layer)
_SKIPPED_LAYER_SUFFIXES = (".rotary_emb.inv_freq",)
# unknown tensors named in one error, at most
_MAX_NAMED = 4


def hf_slices(model: LlamaModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor name with the view of the model parameter that holds it."""
    config = model.config
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    yield "model.embed_tokens.weight", model.embed_weight
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        yield prefix + "input_layernorm.weight", layer.input_norm
        yield prefix + "self_attn.q_proj.weight", layer.qkv_weight[:q]
        yield prefix + "self_attn.k_proj.weight", layer.qkv_weight[q:q + kv]
        yield prefix + "self_attn.v_proj.weight", layer.qkv_weight[q + kv:]
        if layer.qkv_bias is not None:
            yield prefix + "self_attn.q_proj.bias", layer.qkv_bias[:q]
            yield prefix + "self_attn.k_proj.bias", layer.qkv_bias[q:q + kv]
            yield prefix + "self_attn.v_proj.bias", layer.qkv_bias[q + kv:]
        if layer.q_norm is not None:
            yield prefix + "self_attn.q_norm.weight", layer.q_norm
            yield prefix + "self_attn.k_norm.weight", layer.k_norm
        yield prefix + "self_attn.o_proj.weight", layer.o_weight
        yield prefix + "post_attention_layernorm.weight", layer.post_norm
        yield prefix + "mlp.gate_proj.weight", layer.gate_up_weight[:inter]
        yield prefix + "mlp.up_proj.weight", layer.gate_up_weight[inter:]
        yield prefix + "mlp.down_proj.weight", layer.down_weight
    yield "model.norm.weight", model.final_norm
    if model.lm_head_weight is not None:
        yield "lm_head.weight", model.lm_head_weight


@torch.no_grad()
def load_hf_weights(
    model: LlamaModel, get_tensor: Callable[[str], torch.Tensor | None], names: Collection[str],
) -> None:
    """Copy each HF-named tensor into its slot; ``get_tensor`` returns None when absent.

    ``names`` are all the tensors the checkpoint holds.  Ones outside the layers that
    the model has no slot for are skipped (``lm_head.weight`` of a tied model).
    """
    slots = dict(hf_slices(model))
    unknown = sorted(name for name in names if name.startswith("model.layers.") and name not in slots
                     and not name.endswith(_SKIPPED_LAYER_SUFFIXES))
    if unknown:
        more = f" and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
        raise ModelError(
            f"the checkpoint holds layer tensors this model does not use: {', '.join(unknown[:_MAX_NAMED])}{more} "
            "(quantized checkpoints and other architectures are not supported)"
        )
    for name, target in slots.items():
        tensor = get_tensor(name)
        if tensor is None:
            raise ModelError(f"the checkpoint lacks tensor {name!r}")
        if tensor.dtype not in CHECKPOINT_DTYPES:
            raise ModelError(
                f"tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                "only float16/bfloat16/float32 checkpoints are supported (quantized weights are not)"
            )
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(target.shape)}"
            )
        target.copy_(tensor)


def hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The weights under HF names, as independent copies (e.g. for a transformers model)."""
    return {name: tensor.detach().clone() for name, tensor in hf_slices(model)}


@torch.no_grad()
def init_random_weights(model: LlamaModel, seed: int) -> None:
    """Seeded random weights, generated on the model's device one chunk at a time.

    Matrices are normal with std 1/sqrt(fan_in) (activations stay near unit
    scale), norm weights 1 + N(0, 0.1), biases N(0, 0.1).  The same seed gives
    the same weights on the same device type, whatever the dtype (values are
    drawn in float32 and rounded).
    """
    device = model.device
    for index, (name, target) in enumerate(hf_slices(model)):
        generator = torch.Generator(device=device)
        generator.manual_seed((seed * 1_000_003 + index) % (1 << 63))
        if name.endswith("norm.weight"):
            mean, std = 1.0, 0.1
        elif name.endswith(".bias"):
            mean, std = 0.0, 0.1
        else:
            mean, std = 0.0, 1.0 / math.sqrt(target.shape[1])
        flat_rows = target.view(target.shape[0], -1) if target.dim() > 1 else target.view(1, -1)
        rows_per_chunk = max(1, _RANDOM_CHUNK_ELEMENTS // flat_rows.shape[1])
        for start in range(0, flat_rows.shape[0], rows_per_chunk):
            chunk = flat_rows[start:start + rows_per_chunk]
            noise = torch.randn(chunk.shape, generator=generator, dtype=torch.float32, device=device)
            chunk.copy_(noise.mul_(std).add_(mean))
