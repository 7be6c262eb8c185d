"""An embedded cluster: the Executor with its model and KV nodes, in one asyncio program.

Nodes are in-process KVShards (``num_shards``), running shard daemons
(``shard_addresses``), or, with neither, one local torch KV-cache (the
single-process mode). This is what ``fdctl generate``/``serve`` and the embedding
API start.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

import torch

from fastdecode.actors.executor import Executor, ExecutorConfig, RequestStream
from fastdecode.actors.kv_nodes import KVNode, LocalKVNode, ShardKVNode
from fastdecode.actors.model import load_model, resolve_device
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.shard_client import ShardClient, start_embedded_shard
from fastdecode.actors.tensor_io import KV_DTYPE_NAMES
from fastdecode.actors.trace import StepTrace

log = logging.getLogger("fastdecode.cluster")

MIN_EMBEDDED_KV_BYTES = 64 << 20
MAX_EMBEDDED_KV_BYTES = 8 << 30


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "smollm2"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    num_shards: int = 0  # in-process KVShards
    shard_addresses: tuple[str, ...] = ()  # running shard daemons
    shard_kv_memory_bytes: int | None = None  # per in-process shard; None: a share of free memory
    num_cpus: int | None = None  # cores the embedded cluster may use; None: all
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    is_tracing: bool = False

    def __post_init__(self) -> None:
        if self.num_shards < 0:
            raise ValueError("num_shards must be non-negative")
        if self.num_shards and self.shard_addresses:
            raise ValueError("give either in-process shards or shard addresses, not both")
        if self.shard_kv_memory_bytes is not None and self.shard_kv_memory_bytes < 1 << 20:
            raise ValueError("shard KV memory must be at least 1 MiB")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("num_cpus must be at least 1")


def split_threads(num_cpus: int, num_shards: int, *, is_cuda: bool) -> tuple[int, int]:
    """(torch threads for the Executor, threads per in-process shard) without oversubscription.

    On CUDA the Executor needs one core to drive the GPU; on CPU it gets half the
    cores, since it then does the dense math itself.
    """
    if num_shards == 0:
        return num_cpus, 0
    executor = 1 if is_cuda else max(1, num_cpus // 2)
    per_shard = max(1, (num_cpus - executor) // num_shards)
    return executor, per_shard


def shard_cpu_lists(cpus: list[int], num_shards: int, per_shard: int) -> list[tuple[int, ...] | None]:
    """Disjoint cores for each in-process shard's threads, so their teams do not fight
    over the same cores; None (unpinned) where the cores do not go round."""
    if num_shards * per_shard > len(cpus):
        return [None] * num_shards
    return [tuple(cpus[i * per_shard:(i + 1) * per_shard]) for i in range(num_shards)]


def default_shard_kv_bytes(num_shards: int) -> int:
    """A third of the memory available now, shared by the shards, within sane bounds."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = available // 3 // max(1, num_shards)
    return max(MIN_EMBEDDED_KV_BYTES, min(MAX_EMBEDDED_KV_BYTES, share))


class Cluster:
    """The running cluster. Use ``await Cluster.start(config)`` or ``async with``."""

    def __init__(self, config: ClusterConfig, model, tokenizer, executor: Executor, handles) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.executor = executor
        self._handles = handles  # in-process shards to stop

    @classmethod
    async def start(cls, config: ClusterConfig) -> "Cluster":
        cpus = sorted(os.sched_getaffinity(0))[: config.num_cpus or None]
        device = resolve_device(config.device)
        executor_threads, shard_threads = split_threads(len(cpus), config.num_shards, is_cuda=device.type == "cuda")
        shard_cpus = shard_cpu_lists(cpus[executor_threads:], config.num_shards, shard_threads)
        torch.set_num_threads(executor_threads)
        model, tokenizer = await asyncio.to_thread(
            load_model, config.model, dtype=config.dtype, device=str(device), seed=config.seed)
        cfg = model.config
        kv_dtype = KV_DTYPE_NAMES[model.dtype]
        nodes: list[KVNode] = []
        handles = []
        try:
            addresses = list(config.shard_addresses)
            kv_bytes = config.shard_kv_memory_bytes or default_shard_kv_bytes(config.num_shards)
            for cpu_list in shard_cpus:
                address, handle = await start_embedded_shard(threads=shard_threads, kv_memory_bytes=kv_bytes,
                                                              cpu_list=cpu_list)
                handles.append(handle)
                addresses.append(address)
            for address in addresses:
                client = await ShardClient.connect(address)
                nodes.append(ShardKVNode(client))
                await client.configure(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                       head_dim=cfg.head_dim, kv_dtype=kv_dtype)
            if not nodes:
                kv_bytes = config.shard_kv_memory_bytes or default_shard_kv_bytes(1)
                nodes.append(LocalKVNode.for_model("local", model, kv_bytes))
            executor = Executor(model, nodes, config.executor,
                                eos_token_ids=tokenizer.eos_token_ids or cfg.eos_token_ids,
                                trace=StepTrace() if config.is_tracing else None)
            await executor.start()
        except BaseException:
            await _close_all(nodes, handles)
            raise
        log.info("cluster up: model %s on %s (%s), %d KV node(s), executor threads %d, shard threads %d",
                 config.model, device, model.dtype, len(nodes), executor_threads, shard_threads)
        return cls(config, model, tokenizer, executor, handles)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        return self.executor.submit(prompt_ids, params)

    async def kv_used_bytes(self) -> list[int]:
        stats = await asyncio.gather(*(n.stats() for n in self.executor.nodes))
        return [s.used_bytes for s in stats]

    async def stop(self) -> None:
        await self.executor.stop()
        await _close_all(self.executor.nodes, self._handles)

    async def __aenter__(self) -> "Cluster":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def _close_all(nodes: list[KVNode], handles) -> None:
    for node in nodes:
        await node.close()
    for handle in handles:
        await handle.stop()

