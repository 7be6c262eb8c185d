"""Deployment plan: batch size, shard count, throughput, latency and host memory for a model.

The math, per decode step of a batch of B sequences split into two mini-batches
of b = B/2 (see DESIGN.md, "Pipelines" and "Performance model"):

- GPU, per layer and mini-batch: ``t_gpu = T(b) / L``, with T the dense pass of
  b sequences over all L layers (measured profile, or ``GpuSpec`` analytically).
- Shards, per layer and mini-batch: ``t_shard = overhead + b * wire / link
  + b * c * kv_layer / sum(shard bandwidths)``, where ``c = P + O/2`` is the mean
  context under load stabilisation (ages spread evenly over the output length
  O after a prompt of P), ``kv_layer`` the KV bytes per token and layer, and
  ``wire`` the q, k, v and o bytes per token and layer crossing the GPU's link.
  Placement spreads the context in proportion to each shard's bandwidth, so the
  shards finish together.
- The two-stage pipeline runs one layer of the whole batch in
  ``max(2 t_gpu, 2 t_shard, t_gpu + t_shard) = 2 max(t_gpu, t_shard)``; a
  token passes L layers, so ``latency per token = 2 L max(t_gpu, t_shard)``.
  When balanced (``t_shard <= t_gpu``) that is ``2 L T(B/2) / L = 2 T(B/2)``:
  DESIGN.md's "2 * layers * T_gpu" with T_gpu the per-layer time of one
  mini-batch.  It is two dense passes of half the batch: the weights are read
  twice per step, the price of hiding the attention entirely.
- Throughput = B / latency.  Host memory holds every sequence at its final
  length: ``B * ceil((P + O) / page) * page * kv_bytes_per_token``.

A request longer than the model's context (``max_model_len``, when given) is
refused: a server would refuse every such request.

The recommended batch is the smallest B whose throughput is within
``throughput_fraction`` of the best feasible one (past the knee throughput
creeps up while latency grows linearly), subject to the latency limit, GPU
memory (weights and activations; the KV-cache is not on the GPU) and, when
``shard_memory_bytes`` is set, the shards' memory.  For that B, the number of
shards is the fewest (fastest first) with ``t_shard <= t_gpu``, or all allowed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from fastdecode.scheduler.model_shape import ModelShape

_GIB = float(1 << 30)


class PlanError(ValueError):
    """No deployment satisfies the request (model too big for the GPU, latency too tight...)."""


@dataclass(frozen=True)
class PlanRequest:
    """What the deployment must serve and with what hosts (see the module docstring)."""

    prompt_len: int
    output_len: int
    shard_bytes_per_s: tuple[float, ...] = (60e9,)  # one value: as many such shards as needed; several: that pool
    max_shards: int = 64  # cap for the one-value case
    shard_overhead_s: float = 100e-6  # per attend call (one layer, one mini-batch)
    shard_memory_bytes: int | None = None  # per shard; None: not a constraint, only reported
    link_bytes_per_s: float = 50e9  # GPU <-> host transfers of q, k, v, o
    max_latency_s: float | None = None
    max_batch: int = 4096
    page_size: int = 16
    throughput_fraction: float = 0.9
    gpu_reserve_bytes: int = 2 << 30  # CUDA context, allocator slack
    max_model_len: int | None = None  # the model's context (max_position_embeddings); None: not checked

    def __post_init__(self) -> None:
        optional = ("max_model_len",) if self.max_model_len is not None else ()
        for name in ("prompt_len", "output_len", "max_shards", "max_batch", "page_size", *optional):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_batch < 2:
            raise ValueError("max_batch must be at least 2 (two mini-batches)")
        if not self.shard_bytes_per_s or not all(math.isfinite(b) and b > 0 for b in self.shard_bytes_per_s):
            raise ValueError("shard bandwidths must be positive numbers")
        for name in ("link_bytes_per_s",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if not self.shard_overhead_s >= 0:
            raise ValueError("shard_overhead_s must be >= 0")
        if self.shard_memory_bytes is not None and not self.shard_memory_bytes > 0:
            raise ValueError("shard_memory_bytes must be > 0")
        if self.max_latency_s is not None and not self.max_latency_s > 0:
            raise ValueError("max_latency_s must be > 0")
        if not 0 < self.throughput_fraction <= 1:
            raise ValueError("throughput_fraction must be in (0, 1]")
        if self.gpu_reserve_bytes < 0:
            raise ValueError("gpu_reserve_bytes must be >= 0")

    @property
    def mean_context(self) -> float:
        return self.prompt_len + self.output_len / 2.0

    @property
    def final_len(self) -> int:
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class PlanResult:
    batch_size: int
    num_shards: int
    tokens_per_s: float
    ms_per_token: float
    host_memory_gib: float
    shard_gbps: list[float]
    gpu_ms_per_layer: float  # one mini-batch's dense part, one layer
    shard_ms_per_layer: float  # one mini-batch's attention (incl. transfers), one layer
    bound: str  # "gpu" (balanced: shards keep up) or "shards" (not enough shard bandwidth)
    mean_context_tokens: float
    weights_gib: float
    gpu_only_max_batch: int  # sequences whose KV would fit beside the weights on the GPU alone
    reasoning: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Candidate:
    batch: int
    shards: tuple[float, ...]
    t_gpu: float
    t_shard: float


def _workspace_bytes(shape: ModelShape, batch: int) -> int:
    """GPU activations of one mini-batch: float32 logits plus the widest hidden tensors."""
    per_seq = 4 * shape.vocab_size + shape.dtype_bytes * (3 * shape.intermediate_size + 4 * shape.hidden_size)
    return batch * per_seq


def _shard_time(shape: ModelShape, req: PlanRequest, half: int, shards: tuple[float, ...]) -> float:
    read = half * req.mean_context * shape.kv_read_bytes_per_token_layer
    wire = half * shape.wire_bytes_per_token_layer / req.link_bytes_per_s
    return req.shard_overhead_s + wire + read / sum(shards)


def _choose_shards(
    shape: ModelShape, req: PlanRequest, half: int, t_gpu: float, host_bytes: int
) -> tuple[float, ...] | None:
    """Fewest shards (fastest first) that keep up with the GPU and hold the KV; None if memory cannot."""
    if len(req.shard_bytes_per_s) == 1:
        pool = req.shard_bytes_per_s * req.max_shards
    else:
        pool = tuple(sorted(req.shard_bytes_per_s, reverse=True))
    for count in range(1, len(pool) + 1):
        shards = pool[:count]
        fits = req.shard_memory_bytes is None or count * req.shard_memory_bytes >= host_bytes
        if fits and _shard_time(shape, req, half, shards) <= t_gpu:
            return shards
    if req.shard_memory_bytes is not None and len(pool) * req.shard_memory_bytes < host_bytes:
        return None
    return pool


def plan_deployment(
    shape: ModelShape, dense_step_s: Callable[[int], float], req: PlanRequest, gpu_memory_bytes: int | None = None
) -> PlanResult:
    """Recommend a batch size and shard count; PlanError if nothing is feasible."""
    if req.max_model_len is not None and req.final_len > req.max_model_len:
        raise PlanError(
            f"prompt {req.prompt_len} + output {req.output_len} = {req.final_len} tokens do not fit the model's "
            f"context of {req.max_model_len} tokens (max_position_embeddings): a server refuses such requests"
        )
    layers = shape.num_layers
    page_tokens = math.ceil(req.final_len / req.page_size) * req.page_size
    seq_host_bytes = page_tokens * shape.kv_bytes_per_token
    free_gpu = None if gpu_memory_bytes is None else gpu_memory_bytes - req.gpu_reserve_bytes - shape.weight_bytes
    if free_gpu is not None and free_gpu <= 0:
        raise PlanError(
            f"the weights ({shape.weight_bytes / _GIB:.1f} GiB) do not fit in the GPU's "
            f"{gpu_memory_bytes / _GIB:.1f} GiB (keeping {req.gpu_reserve_bytes / _GIB:.1f} GiB in reserve)"
        )
    candidates: list[tuple[float, _Candidate]] = []
    rejected = {"gpu memory": 0, "latency": 0, "host memory": 0}
    for batch in range(2, req.max_batch + 1, 2):
        half = batch // 2
        if free_gpu is not None and _workspace_bytes(shape, half) > free_gpu:
            rejected["gpu memory"] += 1
            continue
        t_gpu = dense_step_s(half) / layers
        shards = _choose_shards(shape, req, half, t_gpu, batch * seq_host_bytes)
        if shards is None:
            rejected["host memory"] += 1
            continue
        t_shard = _shard_time(shape, req, half, shards)
        latency = 2.0 * layers * max(t_gpu, t_shard)
        if req.max_latency_s is not None and latency > req.max_latency_s:
            rejected["latency"] += 1
            continue
        candidates.append((batch / latency, _Candidate(batch, shards, t_gpu, t_shard)))
    if not candidates:
        reasons = ", ".join(f"{k}: {v}" for k, v in rejected.items() if v)
        raise PlanError(f"no batch size from 2 to {req.max_batch} is feasible ({reasons} rejected)")
    best_tps = max(tps for tps, _ in candidates)
    tps, pick = next((tps, c) for tps, c in candidates if tps >= req.throughput_fraction * best_tps)
    latency = 2.0 * layers * max(pick.t_gpu, pick.t_shard)
    bound = "gpu" if pick.t_shard <= pick.t_gpu else "shards"
    host_bytes = pick.batch * seq_host_bytes
    gpu_only = -1 if free_gpu is None else max(0, int(free_gpu // seq_host_bytes))
    reasoning = [
        f"dense part: {pick.t_gpu * 1e3:.3f} ms per layer for a mini-batch of {pick.batch // 2}",
        f"attention: {pick.t_shard * 1e3:.3f} ms per layer on {len(pick.shards)} shard(s) of "
        f"{sum(pick.shards) / 1e9:.0f} GB/s in all, at a mean context of {req.mean_context:.0f} tokens",
        f"{'balanced: the shards keep up with the GPU' if bound == 'gpu' else 'shard-bound: more shard bandwidth would help'}",
        f"latency = 2 x {layers} layers x {max(pick.t_gpu, pick.t_shard) * 1e3:.3f} ms = {latency * 1e3:.2f} ms per token",
        f"batch {pick.batch} gives {tps:.0f} tokens/s, within {req.throughput_fraction:.0%} "
        f"of the best feasible {best_tps:.0f} tokens/s",
        f"host memory: {pick.batch} x {page_tokens} tokens x {shape.kv_bytes_per_token / 1024:.0f} KiB "
        f"= {host_bytes / _GIB:.1f} GiB",
    ]
    if gpu_only >= 0:
        reasoning.append(f"the GPU alone would hold the KV of {gpu_only} such sequences beside the weights")
    return PlanResult(
        batch_size=pick.batch,
        num_shards=len(pick.shards),
        tokens_per_s=tps,
        ms_per_token=latency * 1e3,
        host_memory_gib=host_bytes / _GIB,
        shard_gbps=[b / 1e9 for b in pick.shards],
        gpu_ms_per_layer=pick.t_gpu * 1e3,
        shard_ms_per_layer=pick.t_shard * 1e3,
        bound=bound,
        mean_context_tokens=req.mean_context,
        weights_gib=shape.weight_bytes / _GIB,
        gpu_only_max_batch=gpu_only,
        reasoning=reasoning,
    )
