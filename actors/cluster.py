"""An embedded cluster: the Executor with its model and KV nodes, in one asyncio program.

Nodes are in-process KVShards (``num_shards``), running shard daemons
(``shard_addresses``), or, with neither, one local torch KV-cache (the
single-process mode). ``mode`` picks them explicitly: ``gpu-only`` (one GPU KV
node on the Executor's device, the batch limited by ``gpu_kv_memory_bytes``),
``shards`` (only shards) or ``hybrid`` (the GPU KV node and the shards; at
start-up ``scheduler.hybrid.choose_mode`` compares the predicted tokens/s of both
for the planned batch and drops the shards when they would not help). This is
what ``fdctl generate``/``serve``/``bench`` and the embedding API start.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import math
import os
from dataclasses import dataclass, field

import torch

from fastdecode.actors.dense_profile import measure_dense_profile, time_prefill
from fastdecode.actors.executor import Executor, ExecutorConfig, RequestStream
from fastdecode.actors.gpu_kv import GpuKVConfig, GpuKVNode, free_memory_bytes
from fastdecode.actors.host_memory import available_memory_bytes
from fastdecode.actors.kv_nodes import KVNode, LocalKVNode, node_model
from fastdecode.actors.kvshard import shape_problem
from fastdecode.actors.model import load_model, resolve_config, resolve_device
from fastdecode.actors.model.loader import model_dtype
from fastdecode.actors.model.tokenizer import compile_chat_template
from fastdecode.actors.model.hf_dir import chosen_sampling_defaults
from fastdecode.actors.modes import MODES
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.shard_client import start_embedded_shard
from fastdecode.actors.shard_links import ShardLinks
from fastdecode.actors.structured_output import GrammarBackend
from fastdecode.actors.tensor_io import KV_DTYPE_NAMES
from fastdecode.actors.trace import StepTrace
from fastdecode.scheduler.hybrid import ModeChoice, choose_mode, gpu_only_batch, planned_lengths
from fastdecode.transport.sockets import check_address

log = logging.getLogger("fastdecode.cluster")

MIN_EMBEDDED_KV_BYTES = 64 << 20
MAX_EMBEDDED_KV_BYTES = 8 << 30
GPU_KV_FREE_FRACTION = 0.8  # default GPU KV pool: this share of the device memory free after loading,
GPU_PREFILL_FREE_FRACTION = 0.9  # or less: this share less one longest prompt's K/V, which prefill stages beside it


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
    is_shard_loop_threaded: bool = False  # in-process shards on their own thread and event loop
    mode: str | None = None  # one of MODES; None: shards if any are given, else the local torch KV
    gpu_kv_memory_bytes: int | None = None  # GPU KV pool; None: a share of the free device memory
    # vLLM's gpu_memory_utilization: the share of the CUDA device's memory this process may hold, the GPU KV pool
    # sized to what is left of it (``utilization_kv_bytes``); None: gpu_kv_memory_bytes, or the default share
    gpu_memory_utilization: float | None = None
    is_cuda_graphs: bool = True  # CUDA devices: GPU-KV steps and the shard path's dense segments as CUDA graphs
    is_compiled: bool = True  # CUDA devices: the per-layer dense segments through torch.compile (fused kernels)
    expected_mean_context: int | None = None  # hybrid choice's mean context; None: 3/4 of the max length
    curve_dir: str | None = None  # CURVE keys for the links to shard daemons (fdctl keygen); None: plain
    # the sampling defaults (vLLM's --generation-config): auto, the model's generation_config.json; vllm, none; or a
    # folder holding the generation_config.json to use
    generation_config: str = "auto"
    chat_template: str | None = None  # vLLM's --chat-template: Jinja source used instead of the tokenizer's
    # what start-up made (the model, compiled code) kept out of the cyclic collector's passes while serving, as
    # long-lived servers do after warm-up (fdctl serve, start-gpu and bench set it); off, an embedding app's heap
    # is left as it is
    is_heap_frozen: bool = False
    heartbeat_interval_s: float = 1.0  # shard heartbeats; a silent shard is dead after (liveness + 1) of them
    liveness: int = 3
    # a shard whose attend has not answered in this long is dead, though its heartbeats go on (its worker is stuck):
    # an attend takes milliseconds, and the whole decode step waits for it
    attend_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        has_shards = bool(self.num_shards or self.shard_addresses)
        if self.mode == "gpu-only" and has_shards:
            raise ValueError("gpu-only mode takes no shards")
        if self.mode in ("shards", "hybrid") and not has_shards:
            raise ValueError(f"{self.mode} mode needs shards (num_shards or shard_addresses)")
        if self.gpu_kv_memory_bytes is not None and self.gpu_kv_memory_bytes < 1 << 20:
            raise ValueError("GPU KV memory must be at least 1 MiB")
        utilization = self.gpu_memory_utilization
        if utilization is not None:
            if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
                raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")
            if self.gpu_kv_memory_bytes is not None:
                raise ValueError("give either gpu_memory_utilization or gpu_kv_memory_bytes, not both")
        if self.num_shards < 0:
            raise ValueError("num_shards must be non-negative")
        if self.num_shards and self.shard_addresses:
            raise ValueError("give either in-process shards or shard addresses, not both")
        for address in self.shard_addresses:  # an inproc:// one is a shard of this process (tests, embedding)
            if not address.startswith("inproc://"):
                check_address(address, listener="the shard daemon")
        repeated = sorted({a for a in self.shard_addresses if self.shard_addresses.count(a) > 1})
        if repeated:
            raise ValueError(f"shard address {repeated[0]} is given twice: give each shard daemon once")
        if self.shard_kv_memory_bytes is not None and self.shard_kv_memory_bytes < 1 << 20:
            raise ValueError("shard KV memory must be at least 1 MiB")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("num_cpus must be at least 1")
        if not 0 < self.heartbeat_interval_s < math.inf or self.liveness < 1:
            raise ValueError("heartbeat_interval_s must be positive and liveness at least 1")
        if not 0 < self.attend_timeout_s < math.inf:
            raise ValueError("attend_timeout_s must be a positive number of seconds")


def _check_field_types(config: ClusterConfig) -> None:
    """TypeError naming the field of a ClusterConfig given a value of the wrong type, before a value check
    compares it (or iterates a str); a list of shard addresses is kept as a tuple."""
    for name in ("model", "dtype", "device", "generation_config"):
        value = getattr(config, name)
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    for name in ("seed", "num_shards", "liveness"):
        _check_int(name, getattr(config, name))
    for name in ("shard_kv_memory_bytes", "gpu_kv_memory_bytes", "num_cpus", "expected_mean_context"):
        _check_int(name, getattr(config, name), is_none_ok=True)
    for name in ("is_tracing", "is_shard_loop_threaded", "is_cuda_graphs", "is_compiled", "is_heap_frozen"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(config, name)!r}")
    if config.chat_template is not None and not isinstance(config.chat_template, str):
        raise TypeError(f"chat_template must be the template's Jinja source or None, got {config.chat_template!r}")
    if config.mode is not None and not isinstance(config.mode, str):
        raise TypeError(f"mode must be one of {MODES} or None, got {config.mode!r}")
    if config.curve_dir is not None and not isinstance(config.curve_dir, (str, os.PathLike)):
        raise TypeError(f"curve_dir must be a folder path or None, got {config.curve_dir!r}")
    for name in ("heartbeat_interval_s", "attend_timeout_s"):
        seconds = getattr(config, name)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, got {seconds!r}")
    if not isinstance(config.executor, ExecutorConfig):
        raise TypeError(f"executor must be an ExecutorConfig, got {type(config.executor).__name__}: write "
                        "executor=ExecutorConfig(max_queue=10, ...), or give its fields to LLM(...) as keywords")
    addresses = config.shard_addresses
    if isinstance(addresses, str):  # refused, not taken as one address: a comma-joined list would look like one
        raise TypeError(f"shard_addresses must be a list or tuple of addresses, got the str {addresses!r}: "
                        f"write ({addresses!r},) for one shard")
    if not isinstance(addresses, (list, tuple)) or not all(isinstance(a, str) and a for a in addresses):
        raise TypeError(f"shard_addresses must be a list or tuple of addresses like 'tcp://host:5555', "
                        f"got {addresses!r}")
    object.__setattr__(config, "shard_addresses", tuple(addresses))


def _check_int(name: str, value: object, *, is_none_ok: bool = False) -> None:
    if (value is None and is_none_ok) or (isinstance(value, int) and not isinstance(value, bool)):
        return
    expected = "an int or None" if is_none_ok else "an int"
    hint = ""
    if name.endswith("_bytes"):
        expected = "a number of bytes (an int) or None"
        if isinstance(value, str):  # the CLI's size parser lives in cli/, which actors/ must not import
            hint = f": for a size as text use fastdecode.cli.sizes.parse_size({value!r}), or write e.g. 512 << 20"
    raise TypeError(f"{name} must be {expected}, got {value!r}{hint}")


CUDA_EXECUTOR_CPUS = 2  # cores left to the Executor's Python threads on CUDA (dense thread, event loop)


def split_threads(num_cpus: int, num_shards: int, *, is_cuda: bool) -> tuple[int, int]:
    """(cores for the Executor, threads per in-process shard) without oversubscription.

    On CUDA the Executor drives the GPU from its dense thread while its event loop
    serves in-process shards' messages: two cores where there are 8 or more; on CPU
    it gets half the cores, since it then does the dense math itself.
    """
    if num_shards == 0:
        return num_cpus, 0
    executor = (CUDA_EXECUTOR_CPUS if num_cpus >= 8 else 1) if is_cuda else max(1, num_cpus // 2)
    per_shard = max(1, (num_cpus - executor) // num_shards)
    return executor, per_shard


def executor_torch_threads(executor_cpus: int, *, is_cuda: bool, has_shards: bool) -> int:
    """torch's CPU threads in the Executor. On CUDA with shards its CPU work is a few small host joins:
    one thread, so no torch thread team spins on the cores the shards' teams run on (which made each
    join take milliseconds next to shard daemons on the same host)."""
    return 1 if is_cuda and has_shards else executor_cpus


def shard_cpu_lists(cpus: list[int], num_shards: int, per_shard: int) -> list[tuple[int, ...] | None]:
    """Disjoint cores for each in-process shard's threads, so their teams do not fight
    over the same cores; None (unpinned) where the cores do not go round."""
    if num_shards * per_shard > len(cpus):
        return [None] * num_shards
    return [tuple(cpus[i * per_shard:(i + 1) * per_shard]) for i in range(num_shards)]


def default_shard_kv_bytes(num_shards: int) -> int:
    """A third of the memory available now (``gpu_kv.free_memory_bytes`` of the CPU), shared by the shards,
    within sane bounds."""
    share = free_memory_bytes(torch.device("cpu")) // 3 // max(1, num_shards)
    return max(MIN_EMBEDDED_KV_BYTES, min(MAX_EMBEDDED_KV_BYTES, share))


class Cluster:
    """The running cluster. Use ``await Cluster.start(config)`` or ``async with``."""

    def __init__(self, config: ClusterConfig, model, tokenizer, executor: Executor, handles,
                 mode_choice: ModeChoice | None = None, *, torch_threads_before: int | None = None) -> None:
        self.mode_choice = mode_choice  # hybrid mode: the start-up prediction that kept or dropped the shards
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.executor = executor
        self._handles = handles  # in-process shards to stop
        self._torch_threads_before = torch_threads_before  # the process's torch threads, given back at stop

    @classmethod
    async def start(cls, config: ClusterConfig) -> "Cluster":
        torch_threads_before = torch.get_num_threads()  # the process's, given back at stop or a failed start
        try:
            return await cls._start(config, torch_threads_before)
        except BaseException:
            torch.set_num_threads(torch_threads_before)
            raise

    @classmethod
    async def _start(cls, config: ClusterConfig, torch_threads_before: int) -> "Cluster":
        cpus = sorted(os.sched_getaffinity(0))[: config.num_cpus or None]
        device = resolve_device(config.device)
        executor_threads, shard_threads = split_threads(len(cpus), config.num_shards, is_cuda=device.type == "cuda")
        shard_cpus = shard_cpu_lists(cpus[executor_threads:], config.num_shards, shard_threads)
        torch.set_num_threads(executor_torch_threads(executor_threads, is_cuda=device.type == "cuda",
                                                     has_shards=bool(config.num_shards or config.shard_addresses)))
        defaults = chosen_sampling_defaults(config.generation_config)  # a bad folder is refused before the load
        links = await _links_before_loading(config, device)
        try:
            model, tokenizer = await asyncio.to_thread(
                load_model, config.model, dtype=config.dtype, device=str(device), seed=config.seed)
            if config.chat_template is not None:
                tokenizer = tokenizer.with_chat_template(config.chat_template)
        except BaseException:
            await links.stop()
            raise
        if defaults is not None:
            model.config = dataclasses.replace(model.config, sampling_defaults=defaults)
        if config.is_compiled and device.type == "cuda":
            model.compile_dense()
        cfg = model.config
        nodes: list[KVNode] = []
        handles = []
        factories: dict[int, object] = {}  # id(shard node) -> how to connect it again after a failure
        try:
            handles.append(links)
            addresses = list(config.shard_addresses)
            kv_bytes = config.shard_kv_memory_bytes or default_shard_kv_bytes(config.num_shards)
            for cpu_list in shard_cpus:
                address, handle = await start_embedded_shard(threads=shard_threads, kv_memory_bytes=kv_bytes,
                                                              cpu_list=cpu_list,
                                                              is_threaded=config.is_shard_loop_threaded)
                handles.append(handle)
                addresses.append(address)
            # All at once: shards of one host calibrate while the others do, so each measures the memory
            # bandwidth it gets when they all attend, as they do in every step.
            connects = [functools.partial(links.connect, address) for address in addresses]
            connected = await asyncio.gather(*(connect() for connect in connects), return_exceptions=True)
            for connect, node in zip(connects, connected):
                if not isinstance(node, BaseException):
                    nodes.append(node)  # closed below if another one failed
                    factories[id(node)] = connect
            failed = [node for node in connected if isinstance(node, BaseException)]
            if failed:
                raise failed[0]
            executor_config = config.executor
            gpu_model = None
            mode_choice = None
            step_graphs = None  # made for the hybrid choice, kept for the Executor
            if config.mode not in ("gpu-only", "hybrid") and (config.gpu_memory_utilization is not None
                                                               or config.gpu_kv_memory_bytes is not None):
                log.warning("gpu_memory_utilization and gpu_kv_memory_bytes size the GPU's KV pool of the gpu-only "
                            "and hybrid modes; in %s mode the KV-cache is on the shards (or, without shards, in "
                            "torch on the model's device)",
                            config.mode or "this")
            if config.mode in ("gpu-only", "hybrid"):
                pool_node, cache_bytes = await asyncio.to_thread(_make_gpu_node, config, model)
                nodes.insert(0, pool_node)
                executor_config = dataclasses.replace(executor_config, prefix_cache_bytes=cache_bytes)
                if config.mode == "hybrid":
                    gpu_model, mode_choice, step_graphs = await _choose_mode(config, model, nodes)
                    log.info("hybrid choice: %s", mode_choice)
                    if mode_choice.mode == "gpu-only":
                        await _close_all(nodes[1:], handles)
                        del nodes[1:]
                        handles = []
                        # the shards' cores are free again: the same torch threads as gpu-only mode
                        torch.set_num_threads(executor_torch_threads(len(cpus), is_cuda=True, has_shards=False))
                if len(nodes) == 1:  # nothing to overlap with: one mini-batch
                    executor_config = dataclasses.replace(executor_config, is_pipelined=False)
            if not nodes:
                kv_bytes = config.shard_kv_memory_bytes or default_shard_kv_bytes(1)
                nodes.append(LocalKVNode.for_model("local", model, kv_bytes))
            eos_token_ids = tokenizer.eos_token_ids or cfg.eos_token_ids
            executor = Executor(model, nodes, executor_config, eos_token_ids=eos_token_ids,
                                trace=StepTrace() if config.is_tracing else None, gpu_model=gpu_model,
                                node_factories=[factories.get(id(n)) for n in nodes], seed=config.seed,
                                grammars=GrammarBackend(tokenizer, cfg.vocab_size, eos_token_ids))
            gpu_node = nodes[0] if nodes and isinstance(nodes[0], GpuKVNode) else None
            if config.is_cuda_graphs and device.type == "cuda" and gpu_node is not None:
                from fastdecode.actors.cuda_graphs import StepGraphs

                executor.decoder.graphs = step_graphs or StepGraphs(model, gpu_node,
                                                                    max_batch=config.executor.max_num_seqs)
            if config.is_cuda_graphs and device.type == "cuda" and any(node.is_host for node in nodes):
                from fastdecode.actors.layer_graphs import LayerGraphs

                executor.decoder.layer_graphs = LayerGraphs(model, max_batch=config.executor.max_num_seqs)
            await executor.start()
        except BaseException:
            await _close_all(nodes, handles)
            raise
        log.info("cluster up: model %s on %s (%s), %d KV node(s), executor threads %d, shard threads %d",
                 config.model, device, model.dtype, len(nodes), executor_threads, shard_threads)
        # What start-up made (the model, compiled code, and in hybrid mode whatever the dropped shards left)
        # stays for good: kept out of the cyclic collector's passes while serving, as long-lived serving
        # processes do after warm-up; stop() hands it back.
        if config.is_heap_frozen:
            gc.collect()
            gc.freeze()
        return cls(config, model, tokenizer, executor, handles, mode_choice, torch_threads_before=torch_threads_before)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        return self.executor.submit(prompt_ids, params)

    async def kv_used_bytes(self) -> list[int]:
        """KV bytes in use on each live node (a failed node holds nothing for us)."""
        stats = await asyncio.gather(*(n.stats() for n in self.executor.live_nodes))
        return [s.used_bytes for s in stats]

    async def stop(self) -> None:
        await self.executor.stop()
        await _close_all(self.executor.nodes, self._handles)
        if self.config.is_heap_frozen:
            gc.unfreeze()
        if self._torch_threads_before is not None:
            torch.set_num_threads(self._torch_threads_before)

    async def __aenter__(self) -> "Cluster":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def _links_before_loading(config: ClusterConfig, device: torch.device) -> ShardLinks:
    """What can be checked before the weights load (minutes, for a large model), checked: the model's config, the
    max_model_len against its context, the chat template, the CURVE keys, and that every shard daemon answers. The
    shard links."""
    cfg = await asyncio.to_thread(resolve_config, config.model)
    config.executor.max_len_for(cfg.max_position_embeddings)
    if config.chat_template is not None:
        compile_chat_template(config.chat_template)
    if (config.num_shards or config.shard_addresses) and \
            (problem := shape_problem(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)) is not None:
        raise ValueError(f"this model has {problem}: serve it without shards")
    if config.num_shards and config.shard_kv_memory_bytes:
        total, available = config.num_shards * config.shard_kv_memory_bytes, available_memory_bytes()
        if total > available:  # their pools pre-fault it all, at once: more gets this process OOM-killed
            raise ValueError(f"{config.num_shards} in-process shards of {config.shard_kv_memory_bytes / (1 << 30):.1f} "
                             f"GiB of KV each take more memory than this host can give now "
                             f"({available / (1 << 30):.1f} GiB available): give a smaller --kv-memory")
    shape = dict(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                 kv_dtype=KV_DTYPE_NAMES[model_dtype(config.model, config.dtype, device)])
    links = ShardLinks.open(config, shape=shape)
    try:
        await links.ping_distinct(config.shard_addresses)
    except BaseException:
        await links.stop()
        raise
    return links


def max_len(config: ClusterConfig, model) -> int:
    """The longest sequence the Executor admits (a GPU KV slot's length)."""
    return config.executor.max_len_for(model.config.max_position_embeddings)


def default_gpu_kv_bytes(free_bytes: int, max_len: int, kv_bytes_per_token: int) -> int:
    """The default GPU KV pool: ``GPU_KV_FREE_FRACTION`` of the free memory, less where a prompt of ``max_len``
    tokens would not fit beside it. A prompt's prefill stages its K/V (``max_len * kv_bytes_per_token``) outside
    the pool until it is placed, and the step's activations need room too: at a long context on a large model
    (16 GiB for 128k tokens of Llama-3-8B) that is more than the fifth of the memory the fraction leaves."""
    staging = max_len * kv_bytes_per_token
    return max(0, min(int(free_bytes * GPU_KV_FREE_FRACTION), int(free_bytes * GPU_PREFILL_FREE_FRACTION) - staging))


def utilization_kv_bytes(utilization: float, total_bytes: int, free_bytes: int, own_bytes: int, max_len: int,
                         kv_bytes_per_token: int) -> int:
    """The GPU KV pool under vLLM's ``gpu_memory_utilization``, a share of the device for this server alone: what
    the memory this process holds already (``own_bytes``: the weights) leaves of that share, and at most
    ``GPU_PREFILL_FREE_FRACTION`` of the free memory (room for the step's activations, and for other processes'
    memory: two servers at 0.5 fit), less one longest prompt's prefill staging (as the default)."""
    budget = int(utilization * total_bytes) - own_bytes
    return max(0, min(budget, int(free_bytes * GPU_PREFILL_FREE_FRACTION)) - max_len * kv_bytes_per_token)


def gpu_prefix_cache_bytes(prefix_cache_bytes: int, share_bytes: int) -> int:
    """The prefix cache's budget on a CUDA device whose KV pool is sized from its memory (``share_bytes``, what the
    pool would get alone): at most a tenth of that share, the rest the pool's. vLLM's cache costs no memory (its
    blocks are the pool's pages); here it holds copies, so it must not halve a small GPU's pool."""
    return min(prefix_cache_bytes, max(0, share_bytes) // 10)


def _make_gpu_node(config: ClusterConfig, model) -> tuple[GpuKVNode, int]:
    """The GPU KV node of the gpu-only and hybrid modes, and the prefix cache's budget beside it (the config's,
    unless the pool is sized from the device's memory: gpu_prefix_cache_bytes)."""
    cache_bytes = config.executor.prefix_cache_bytes
    memory = config.gpu_kv_memory_bytes
    if memory is None:
        if model.device.type == "cuda":
            length, kv_bytes_per_token = max_len(config, model), model.config.kv_bytes_per_token(model.dtype.itemsize)
            free, total = (int(b) for b in torch.cuda.mem_get_info(model.device))
            if config.gpu_memory_utilization is None:
                memory = default_gpu_kv_bytes(free, length, kv_bytes_per_token)
                room = f"the {free / (1 << 30):.1f} GiB of GPU memory free after loading the model"
            else:
                own = int(torch.cuda.memory_reserved(model.device))
                memory = utilization_kv_bytes(config.gpu_memory_utilization, total, free, own, length,
                                              kv_bytes_per_token)
                room = (f"gpu_memory_utilization {config.gpu_memory_utilization} of {total / (1 << 30):.1f} GiB, with "
                        f"{own / (1 << 30):.1f} GiB held by the model and {free / (1 << 30):.1f} GiB free,")
            cache_bytes = gpu_prefix_cache_bytes(config.executor.prefix_cache_bytes, memory)
            memory -= cache_bytes  # the prefix cache's blocks live on the device too
            if memory < 1:
                raise ValueError(f"{room} holds no KV pool beside the prefix cache and the prefill of a {length}-token "
                                 "prompt: give a smaller max_model_len or prefix cache" +
                                 (" or a larger gpu_memory_utilization"
                                  if config.gpu_memory_utilization is not None else ""))
        else:
            if config.gpu_memory_utilization is not None:
                log.warning("gpu_memory_utilization sizes a CUDA device's KV pool; on the CPU the pool is a share of "
                            "the memory available (give gpu_kv_memory_bytes, --gpu-kv-memory, to set it)")
            memory = default_shard_kv_bytes(1)
    node = GpuKVNode.for_model("gpu-kv", model, GpuKVConfig(memory_bytes=memory, slot_len=max_len(config, model)))
    log.info("%s KV pool: %.2f GiB, %d sequences of up to %d tokens; prefix cache up to %.2f GiB",
             "GPU" if model.device.type == "cuda" else "gpu-only mode's (on the CPU)", memory / (1 << 30),
             node.num_slots, node.config.slot_len, cache_bytes / (1 << 30))
    return node, cache_bytes


async def _choose_mode(config: ClusterConfig, model, nodes: list[KVNode]):
    """The GPU's dense-step model, the gpu-only/hybrid choice for the planned batch, and the GPU node's
    step graphs made for it (None without CUDA graphs).

    With CUDA graphs the gpu-only side is judged by a timed whole-step replay at the batch the GPU
    node holds, every row at the planned mean context: the eager dense profile over-rates that step,
    which would favour hybrid where it is not faster. The replay pays the KV reading itself (attention
    that stops at a row's length reads the mean context of each slot; the masked kinds read every
    column), so nothing is added for it: adding the node's calibrated attention time made the 70B
    gpu-only step 55-58 ms against 41 ms measured on the H200 host."""
    batch = config.executor.max_num_seqs
    profile = config.executor.profile_batches or tuple(sorted({1, max(2, batch // 2), batch}))
    gpu_model = await asyncio.to_thread(measure_dense_profile, model, profile)
    kv_bytes_per_token = model.config.kv_bytes_per_token(model.dtype.itemsize)
    stats = await asyncio.gather(*(n.stats() for n in nodes))
    models = [node_model(i, s, num_layers=model.config.num_layers, kv_bytes_per_token=kv_bytes_per_token)
              for i, s in enumerate(stats)]
    final_len = max_len(config, model)
    mean_context = config.expected_mean_context or max(1, final_len * 3 // 4)
    graphs, measured = None, None
    on_gpu = gpu_only_batch(models[0], batch, final_len)
    if config.is_cuda_graphs and model.device.type == "cuda" and on_gpu:
        from fastdecode.actors.cuda_graphs import StepGraphs

        graphs = StepGraphs(model, nodes[0], max_batch=batch)
        context_len = min(round(mean_context), nodes[0].config.slot_len)
        samples = await asyncio.to_thread(graphs.profile, [on_gpu], context_len=context_len)
        if samples:
            measured = samples[0][1]
    prompt_len, _ = planned_lengths(mean_context, final_len)
    prefill_s = await asyncio.to_thread(time_prefill, model, prompt_len)
    return gpu_model, choose_mode(gpu_model, models[0], models[1:], batch=batch, mean_context=mean_context,
                                  final_len=final_len, measured_gpu_only_step_s=measured,
                                  prefill_s=prefill_s), graphs


async def _close_all(nodes: list[KVNode], handles) -> None:
    for node in nodes:
        await node.close()
    for handle in handles:
        await handle.stop()

