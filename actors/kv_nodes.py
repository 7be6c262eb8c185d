"""Where a sequence's KV-cache lives: a remote KVShard, or the Executor's own memory.

The Executor sees every KV holder through one small async interface, so the step
loop does not care whether attention runs on a CPU shard across the network or in
torch next to the weights (single-process runs, and the GPU-KV node of hybrid
mode). Inputs are torch tensors: a shard node takes host tensors (the Executor
stages device data to the host once per mini-batch), a local node takes them on
its own device.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastdecode.actors.model.attention import TorchKVCache
from fastdecode.actors.tensor_io import from_numpy, to_numpy
from fastdecode.scheduler import GpuPerfModel, NodeModel, ShardPerfModel
from fastdecode.transport.shard_messages import Attend, AttendResult

if TYPE_CHECKING:
    from fastdecode.actors.shard_client import ShardClient


@dataclass(frozen=True)
class NodeStats:
    capacity_bytes: int
    used_bytes: int
    page_size: int  # tokens per page
    num_total_pages: int  # pages of page_size tokens for one (sequence, layer)
    num_sequences: int
    attn_gbps: float | None  # measured attention bandwidth, None until measured
    attend_overhead_s: float | None = None  # per-call overhead from the node's calibration


# A node's attend-time model before it is measured: 100 us per call, 5 GB/s.
DEFAULT_ATTEND_OVERHEAD_S = 1e-4
DEFAULT_ATTEND_BYTES_PER_S = 5e9


def node_model(index: int, stats: NodeStats, *, num_layers: int, kv_bytes_per_token: int,
               whole_step: GpuPerfModel | None = None) -> NodeModel:
    """The scheduler's view of a node, with its measured attention bandwidth when known, and the
    time of a whole step on it when its steps run as one call (the GPU KV node's CUDA graphs)."""
    bandwidth = stats.attn_gbps * 1e9 if stats.attn_gbps else DEFAULT_ATTEND_BYTES_PER_S
    return NodeModel(
        node_id=index,
        capacity_bytes=stats.num_total_pages // num_layers * stats.page_size * kv_bytes_per_token,
        kv_bytes_per_token=kv_bytes_per_token,
        num_layers=num_layers,
        page_size=stats.page_size,
        perf=ShardPerfModel(stats.attend_overhead_s or DEFAULT_ATTEND_OVERHEAD_S, bandwidth),
        whole_step=whole_step,
    )


class KVNode(abc.ABC):
    """A holder of KV-caches that attends for the sequences it owns."""

    node_id: str
    is_host: bool  # True: takes and returns host (CPU) tensors
    can_attend_now = False  # True: attend_now works (a node on the Executor's own device)

    @abc.abstractmethod
    async def allocate(self, seq_ids: list[int]) -> None: ...

    @abc.abstractmethod
    async def free(self, seq_ids: list[int]) -> None: ...

    @abc.abstractmethod
    async def append_prompt(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt's K/V, ``[num_layers, T, Hkv, D]`` each."""

    @abc.abstractmethod
    async def attend(
        self, layer: int, seq_ids: np.ndarray, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Append each row's k, v to its sequence at ``layer``, attend q over the whole cache."""

    def attend_now(self, layer: int, seq_ids: np.ndarray, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
        """``attend`` as a plain call on the caller's thread, for nodes on the Executor's own
        device (``can_attend_now``): a step whose rows all live on such nodes runs every layer
        in one call on the dense thread."""
        raise NotImplementedError(f"{type(self).__name__} attends only through messages")

    def begin_attend(self, layer: int, seq_ids: np.ndarray, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> object:
        """Start ``attend`` from the dense thread (no event loop); ``end_attend`` takes what this returns.

        The decode step sends every node its rows before it waits for any of them. A node on the
        Executor's device (``can_attend_now``) attends right here."""
        return self.attend_now(layer, seq_ids, q, k, v)

    def end_attend(self, pending: object) -> torch.Tensor:
        """The output of the attend that ``begin_attend`` started (waits for it)."""
        return pending

    def is_attend_done(self, pending: object) -> bool:
        """True when ``end_attend(pending)`` would not wait (for timing: when the node was done)."""
        return True

    @abc.abstractmethod
    async def stats(self) -> NodeStats: ...

    async def close(self) -> None:
        """Release the node's resources (a no-op where there are none)."""


class LocalKVNode(KVNode):
    """KV-cache in torch on the Executor's device (single-process runs)."""

    is_host = False
    can_attend_now = True

    def __init__(self, node_id: str, *, capacity_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.node_id = node_id
        self._cache = TorchKVCache(num_layers, num_kv_heads, head_dim, dtype=dtype, device=device)
        self._capacity_bytes = capacity_bytes
        self._num_layers = num_layers
        self._bytes_per_token_layer = 2 * num_kv_heads * head_dim * dtype.itemsize  # K and V, one layer
        self._num_tokens: dict[int, int] = {}  # seq_id -> tokens held in each layer

    async def allocate(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._cache.allocate(seq_id)
            self._num_tokens[seq_id] = 0

    async def free(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._cache.free(seq_id)
            del self._num_tokens[seq_id]

    async def append_prompt(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for layer in range(k.shape[0]):
            self._cache.append(seq_id, layer, k[layer], v[layer])
        self._num_tokens[seq_id] += k.shape[1]

    @classmethod
    def for_model(cls, node_id: str, model, capacity_bytes: int) -> "LocalKVNode":
        cfg = model.config
        return cls(node_id, capacity_bytes=capacity_bytes, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, dtype=model.dtype, device=model.device)

    async def attend(self, layer, seq_ids, q, k, v):
        return self.attend_now(layer, seq_ids, q, k, v)

    def attend_now(self, layer, seq_ids, q, k, v):
        ids = [int(s) for s in seq_ids]
        o = self._cache.attend(layer, ids, q, k, v)
        if layer == 0:
            for seq_id in ids:
                self._num_tokens[seq_id] += 1
        return o

    async def stats(self) -> NodeStats:
        used = sum(self._num_tokens.values()) * self._bytes_per_token_layer * self._num_layers
        total_pages = self._capacity_bytes // self._bytes_per_token_layer  # one-token pages
        return NodeStats(self._capacity_bytes, used, 1, total_pages, len(self._num_tokens), None)


def _host_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else to_numpy(x)


class ShardKVNode(KVNode):
    """A KVShard actor reached through a ShardClient (in-process or remote)."""

    is_host = True

    def __init__(self, client: "ShardClient") -> None:
        self.node_id = client.address
        self.client = client

    async def allocate(self, seq_ids: list[int]) -> None:
        await self.client.allocate(seq_ids)

    async def free(self, seq_ids: list[int]) -> None:
        await self.client.free(seq_ids)

    async def append_prompt(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        await self.client.append_prompt(seq_id, to_numpy(k.cpu()), to_numpy(v.cpu()))

    async def attend(self, layer, seq_ids, q, k, v):
        o, _ = await self.client.attend(layer, seq_ids, to_numpy(q), to_numpy(k), to_numpy(v))
        return from_numpy(o)

    def begin_attend(self, layer, seq_ids, q, k, v) -> int:
        """q, k, v: host tensors or their numpy views (sent without a copy: keep them unchanged until the reply)."""
        message = Attend(int(layer), np.asarray(seq_ids, dtype=np.int64), _host_array(q), _host_array(k),
                         _host_array(v))
        return self.client.link.send(message)

    def end_attend(self, pending: int) -> torch.Tensor:
        return from_numpy(self.client.link.receive(pending, AttendResult).o)

    def is_attend_done(self, pending: int) -> bool:
        return self.client.link.has_reply()

    async def stats(self) -> NodeStats:
        s = await self.client.stats()
        return NodeStats(s.capacity_bytes, s.used_bytes, s.page_size, s.num_total_pages, s.num_sequences,
                         s.attn_gbps or s.calibrated_gbps, s.attend_overhead_s)

    async def close(self) -> None:
        await self.client.close()
