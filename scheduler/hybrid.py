"""Hybrid or gpu-only: does adding CPU shards beside the GPU KV node pay, for a planned batch?

Pure arithmetic on the calibrated models; the Cluster asks once at start-up.

- gpu-only, ``n = min(B, gpu capacity)`` sequences of mean context ``c``, one
  mini-batch, dense work and attention on the same device, one after the other:
  ``step = T(n) + L * a_gpu(n c)``; tokens/s ``= n / step``.
- hybrid, ``g`` sequences on the GPU node and ``B - g`` spread over the shards in
  proportion to their bandwidth, two mini-batches of half of each: per layer and
  mini-batch the GPU side takes ``T(B/2)/L + a_gpu(g c / 2)`` and the shard side
  ``max_s a_s(r_s c / 2)``, and the pipeline runs a layer in twice the larger of
  the two: ``step = 2 L max(gpu side, shard side)``.  Every ``g`` the GPU's memory
  allows is tried, with the shards' memory as a limit; the best tokens/s is kept.

Each shard-side layer also pays ``message_s`` for the attend messages (the
per-message Python work the calibrated shard model leaves out).
Both rates count each sequence's prefill (``prefill_s``, one forward pass over its prompt on the
GPU, which stops the decode steps while it runs): a batch of ``n`` sequences decoding ``O`` tokens
each makes ``n O`` tokens in ``n prefill_s + O step``. Prefills cost every sequence the same in both
modes, so they shrink a decode-step gain towards 1 without reversing it: ``min_gain`` is then asked
of the gain a user sees end to end, not of the decode step alone.
``choose_mode`` returns "hybrid" only when its best tokens/s beats gpu-only's by
``min_gain`` (a prediction error smaller than that must not make us slower).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import GpuPerfModel


# Per attend message to the shards, beyond the node's calibrated call: the Executor's and the
# shard's Python work per message and the wire (docs/benchmarks.md, session 2 on the H100 host: with
# two shard daemons at batch 64 a round trip took 2.1-2.7 ms against 0.8-1.0 ms of KV reading).
MESSAGE_S = 1.5e-3


@dataclass(frozen=True)
class ModeChoice:
    mode: str  # "gpu-only" or "hybrid"
    gpu_only_tokens_per_s: float
    hybrid_tokens_per_s: float
    gpu_only_step_s: float
    hybrid_step_s: float
    gpu_only_batch: int
    hybrid_gpu_sequences: int  # of the planned batch, on the GPU node in the best hybrid split
    prefill_s: float = 0.0  # per sequence, as counted in both rates

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _capacity(node: NodeModel, context_len: int) -> int:
    return node.num_pages // node.pages_for(context_len)


def gpu_only_step_s(gpu: GpuPerfModel, gpu_node: NodeModel, batch: int, mean_context: float) -> float:
    return gpu.predict(batch) + gpu_node.num_layers * gpu_node.predict_attend_s(batch * mean_context)


def hybrid_step_s(gpu: GpuPerfModel, gpu_node: NodeModel, shards: list[NodeModel], batch: int,
                  on_gpu: int, mean_context: float, message_s: float = 0.0) -> float:
    layers = gpu_node.num_layers
    on_shards = batch - on_gpu
    gpu_side = gpu.predict(batch / 2) / layers + gpu_node.predict_attend_s(on_gpu * mean_context / 2)
    bandwidths = [1.0 / s.perf.predict(1e9) for s in shards]  # relative speeds
    total = sum(bandwidths)
    shard_side = max((s.predict_attend_s(on_shards * w / total * mean_context / 2) for s, w in zip(shards, bandwidths)),
                     default=0.0)
    if on_shards:
        shard_side += message_s
    return 2 * layers * max(gpu_side, shard_side)


def gpu_only_batch(gpu_node: NodeModel, batch: int, final_len: int) -> int:
    """How many of ``batch`` sequences of up to ``final_len`` tokens the GPU node holds at once."""
    return min(batch, _capacity(gpu_node, final_len))


def planned_lengths(mean_context: float, final_len: int) -> tuple[int, int]:
    """(prompt, output) tokens per sequence of a plan given as a mean context and a final length: the
    context grows by one token per output token, so its mean is the prompt plus half the output."""
    prompt = max(1, min(final_len - 1, round(2 * mean_context - final_len)))
    return prompt, final_len - prompt


def end_to_end_rate(num_seqs: int, step_s: float, prefill_s: float, num_output: int) -> float:
    """Tokens/s of ``num_seqs`` sequences that each prefill once and decode ``num_output`` tokens."""
    return num_seqs * num_output / (num_seqs * prefill_s + num_output * step_s) if num_seqs else 0.0


def choose_mode(gpu: GpuPerfModel, gpu_node: NodeModel, shards: list[NodeModel], *, batch: int,
                mean_context: float, final_len: int, min_gain: float = 0.03,
                message_s: float = MESSAGE_S, measured_gpu_only_step_s: float | None = None,
                prefill_s: float = 0.0) -> ModeChoice:
    """gpu-only or hybrid for ``batch`` sequences of ``mean_context`` tokens, ``final_len`` at most.

    ``measured_gpu_only_step_s``: the gpu-only step as it really runs (a whole-step CUDA graph replay
    at ``gpu_only_batch``, its rows attending over ``mean_context``), instead of the eager dense profile's estimate.
    ``prefill_s``: one sequence's prefill; the output length per sequence comes from ``planned_lengths``."""
    if batch < 1 or mean_context <= 0 or final_len < 1:
        raise ValueError("batch, mean_context and final_len must be positive")
    if prefill_s < 0:
        raise ValueError("prefill_s must not be negative")
    _, num_output = planned_lengths(mean_context, final_len)
    gpu_cap = _capacity(gpu_node, final_len)
    n = gpu_only_batch(gpu_node, batch, final_len)
    if measured_gpu_only_step_s is not None and n:
        only_step = measured_gpu_only_step_s
    else:
        only_step = gpu_only_step_s(gpu, gpu_node, n, mean_context) if n else float("inf")
    only_rate = end_to_end_rate(n, only_step, prefill_s, num_output)
    shard_cap = sum(_capacity(s, final_len) for s in shards)
    best = (0.0, float("inf"), 0)
    for on_gpu in range(max(0, batch - shard_cap), min(batch, gpu_cap) + 1):
        if not shards and on_gpu < batch:
            continue
        step = hybrid_step_s(gpu, gpu_node, shards, batch, on_gpu, mean_context, message_s)
        rate = end_to_end_rate(batch, step, prefill_s, num_output)
        if rate > best[0]:
            best = (rate, step, on_gpu)
    mode = "hybrid" if best[0] > only_rate * (1 + min_gain) else "gpu-only"
    return ModeChoice(mode, only_rate, best[0], only_step, best[1], n, best[2], prefill_s)
