import os

import pytest
import torch

from fastdecode.actors.cluster import ClusterConfig, executor_torch_threads, shard_cpu_lists, split_threads
from fastdecode.actors.executor_config import ExecutorConfig


def test_split_threads_never_oversubscribes():
    assert split_threads(16, 4, is_cuda=True) == (2, 3)
    assert split_threads(4, 1, is_cuda=True) == (1, 3)
    assert split_threads(2, 1, is_cuda=False) == (1, 1)
    assert split_threads(8, 0, is_cuda=False) == (8, 0)
    executor, per_shard = split_threads(64, 4, is_cuda=False)
    assert executor + 4 * per_shard <= 64


def test_shard_cpu_lists_are_disjoint_or_unpinned():
    lists = shard_cpu_lists(list(range(1, 16)), 4, 3)
    assert lists == [(1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)]
    assert shard_cpu_lists([1], 3, 1) == [None, None, None]  # too few cores: leave them unpinned


def test_cluster_config_refuses_contradictions():
    with pytest.raises(ValueError):
        ClusterConfig(num_shards=1, shard_addresses=("tcp://127.0.0.1:1",))
    with pytest.raises(ValueError):
        ClusterConfig(num_shards=-1)


def test_executor_runs_torch_single_threaded_beside_shards_on_cuda():
    assert executor_torch_threads(2, is_cuda=True, has_shards=True) == 1
    assert executor_torch_threads(16, is_cuda=True, has_shards=False) == 16
    assert executor_torch_threads(8, is_cuda=False, has_shards=True) == 8


def test_each_cluster_run_names_its_own_shard_session():
    from fastdecode.actors.cluster import ShardLinks

    shape = dict(num_layers=2, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16")
    first, second = (ShardLinks.open(ClusterConfig(), shape=shape) for _ in range(2))
    assert first.session_id != second.session_id  # a restarted Executor frees what the last one left
    assert all(0 < links.session_id < 1 << 63 for links in (first, second))


async def test_two_addresses_that_reach_one_shard_daemon_are_refused():
    """The same daemon under two addresses would count its memory twice and overflow its pool: refused before the
    weights load, naming both addresses; distinct daemons pass."""
    from fastdecode.actors.cluster import ShardLinks
    from fastdecode.transport.codec import Codec
    from fastdecode.transport.server import RpcServer
    from fastdecode.transport.shard_messages import SHARD_CHANNEL

    servers = [RpcServer("tcp://127.0.0.1:0", Codec(SHARD_CHANNEL), lambda peer, request_id, message: None)
               for _ in range(2)]  # each answers Pings with its own instance id, as a shard daemon does
    first, second = [await server.start() for server in servers]
    alias = first.replace("127.0.0.1", "localhost")
    links = ShardLinks(shape={}, ctx=None, heartbeat_interval_s=0.5, liveness=3, attend_timeout_s=10.0)
    try:
        await links.ping_distinct((first, second))
        with pytest.raises(ValueError, match=f"shard addresses {first} and {alias} reach the same shard daemon"):
            await links.ping_distinct((first, second, alias))
    finally:
        for server in servers:
            await server.close()


def test_a_shard_address_given_twice_is_refused():
    with pytest.raises(ValueError, match="shard address tcp://h:1 is given twice: give each shard daemon once"):
        ClusterConfig(shard_addresses=["tcp://h:2", "tcp://h:1", "tcp://h:1"])


def test_default_shard_memory_is_a_third_of_the_available_memory_shared_within_bounds(monkeypatch):
    import fastdecode.actors.cluster as cluster

    monkeypatch.setattr(cluster, "free_memory_bytes", lambda device: 12 << 30)  # MemAvailable, page cache included
    assert cluster.default_shard_kv_bytes(2) == 2 << 30
    monkeypatch.setattr(cluster, "free_memory_bytes", lambda device: 1 << 20)
    assert cluster.default_shard_kv_bytes(1) == cluster.MIN_EMBEDDED_KV_BYTES


def test_the_default_gpu_pool_leaves_room_for_the_longest_prompt_to_be_prefilled():
    from fastdecode.actors.cluster import default_gpu_kv_bytes

    gib = 1 << 30
    llama3_8b = 128 << 10  # KV bytes per token in bf16
    # 8k tokens stage 1 GiB: 0.8 of 63 GiB free, as before
    assert default_gpu_kv_bytes(63 * gib, 8192, llama3_8b) == int(63 * gib * 0.8)
    # 128k tokens stage 16 GiB, more than the fifth the fraction leaves: 0.9 of it less those 16 GiB
    pool = default_gpu_kv_bytes(63 * gib, 131072, llama3_8b)
    assert pool == int(63 * gib * 0.9) - 16 * gib
    assert 63 * gib - pool >= 16 * gib + 6 * gib
    assert default_gpu_kv_bytes(10 * gib, 131072, llama3_8b) == 0  # nothing fits: the node says so


def test_gpu_memory_utilization_sizes_the_pool_from_the_devices_whole_memory():
    """vLLM's share of the whole device: what the weights (in use now) leave of it, less the prefill staging."""
    from fastdecode.actors.cluster import utilization_kv_bytes

    gib = 1 << 30
    llama3_8b = 128 << 10
    # 80 GiB device, 16 GiB of weights loaded: 0.9 leaves 72 - 16 = 56 GiB, less 1 GiB staging for 8k tokens
    assert utilization_kv_bytes(0.9, 80 * gib, 64 * gib, 16 * gib, 8192, llama3_8b) == 55 * gib
    # 0.99 would take 63.2 GiB of the 64 free: held to 0.9 of the free (activations), less the staging
    assert utilization_kv_bytes(0.99, 80 * gib, 64 * gib, 16 * gib, 8192, llama3_8b) == int(64 * gib * 0.9) - gib
    assert utilization_kv_bytes(0.2, 80 * gib, 64 * gib, 16 * gib, 8192, llama3_8b) == 0  # the weights pass 0.2
    # a second server at 0.5 beside one that holds 40 GiB: its own share, within what is free
    assert utilization_kv_bytes(0.5, 80 * gib, 38 * gib, 2 * gib, 8192, llama3_8b) == int(38 * gib * 0.9) - gib
    for bad in (0, 1.5, "0.9", True):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            ClusterConfig(gpu_memory_utilization=bad)
    with pytest.raises(ValueError, match="not both"):
        ClusterConfig(gpu_memory_utilization=0.5, gpu_kv_memory_bytes=1 << 30)


async def test_gpu_memory_options_outside_the_gpu_modes_are_said_to_do_nothing(caplog):
    """vLLM command lines pass --gpu-memory-utilization by habit: in shards mode (or with the local KV) it sizes no
    pool, and the log says so."""
    from fastdecode.actors.cluster import Cluster

    config = ClusterConfig(model="random:tiny", device="cpu", dtype="float32", gpu_memory_utilization=0.5,
                           shard_kv_memory_bytes=16 << 20, executor=ExecutorConfig(max_model_len=64))
    with caplog.at_level("WARNING", logger="fastdecode.cluster"):
        async with await Cluster.start(config):
            pass
    assert "in this mode the KV-cache is on the shards" in caplog.text


@pytest.mark.cuda
async def test_gpu_memory_utilization_sizes_the_cuda_pool():
    import torch

    from fastdecode.actors.api import AsyncLLM

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = ClusterConfig(model="random:tiny", device="cuda", mode="gpu-only", gpu_memory_utilization=0.5,
                           is_cuda_graphs=False, is_compiled=False,
                           executor=ExecutorConfig(max_model_len=256, is_warmed_up=False))
    llm = await AsyncLLM.start(config)
    try:
        node = llm.cluster.executor.nodes[0].inner  # the GPU node, behind its guard
        free, total = torch.cuda.mem_get_info()
        pool = node.config.memory_bytes
        assert 0.3 * total < pool < 0.5 * total  # half the device, less what is in use (other tests' too)
    finally:
        await llm.stop()


@pytest.mark.parametrize("fields, message", [
    (dict(shard_addresses="tcp://h:1"), r"shard_addresses must be a list.*\('tcp://h:1',\)"),
    (dict(shard_addresses=("tcp://h:1", 5)), "shard_addresses must be a list"),
    (dict(num_shards="2"), "num_shards must be an int"),
    (dict(num_shards=1.5), "num_shards must be an int"),
    (dict(num_shards=True), "num_shards must be an int"),
    (dict(shard_kv_memory_bytes="512MiB"), r"shard_kv_memory_bytes must be a number of bytes.*parse_size"),
    (dict(gpu_kv_memory_bytes=1.5e9), "gpu_kv_memory_bytes must be a number of bytes"),
    (dict(num_cpus="2"), "num_cpus must be an int or None"),
    (dict(model=None), "model must be a non-empty str"),
    (dict(executor={"max_queue": 10}), r"executor must be an ExecutorConfig.*ExecutorConfig\(max_queue=10"),
    (dict(seed="0"), "seed must be an int"),
    (dict(is_tracing="yes"), "is_tracing must be a bool"),
    (dict(heartbeat_interval_s="1"), "heartbeat_interval_s must be a number"),
])
def test_cluster_config_names_the_field_of_a_wrong_type(fields, message):
    with pytest.raises(TypeError, match=message):
        ClusterConfig(**fields)


def test_cluster_config_keeps_a_list_of_shard_addresses_as_a_tuple():
    config = ClusterConfig(shard_addresses=["tcp://h:1", "tcp://h:2"])
    assert config.shard_addresses == ("tcp://h:1", "tcp://h:2")
    hash(config)  # frozen and hashable, as a tuple keeps it


@pytest.mark.parametrize("fields, error", [
    (dict(shard_addresses=("tcp://127.0.0.1:{port}",), heartbeat_interval_s=0.1), "no KVShard answers"),
    (dict(executor=dict(max_model_len=10**6)), "max_model_len"),
    (dict(curve_dir="{tmp}", shard_addresses=("tcp://127.0.0.1:{port}",)), "client.secret|public|secret"),
    (dict(model="random:no-such-preset"), "unknown random preset"),
    (dict(chat_template="{% for m in messages %}"), "chat template"),
])
async def test_start_up_mistakes_are_found_before_the_weights_load(monkeypatch, tmp_path, fields, error):
    """A wrong shard address, a max_model_len past the model's context, a keys folder without the client's keys or
    an unknown model fail at once: the weights (minutes of loading for a large model) are not touched first."""
    import fastdecode.actors.cluster as cluster
    from daemons import free_port

    from fastdecode.actors.cluster import Cluster
    from fastdecode.actors.executor_config import ExecutorConfig

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded first")

    monkeypatch.setattr(cluster, "load_model", no_load)
    port = free_port()
    values = {key: (tuple(a.format(port=port) for a in value) if key == "shard_addresses"
                    else ExecutorConfig(**value) if key == "executor"
                    else value.format(tmp=tmp_path) if key == "curve_dir" else value)
              for key, value in fields.items()}
    config = ClusterConfig(**{"model": "random:tiny", "device": "cpu", **values})
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) + 1)  # what no start sets: its own count must come back
    try:
        with pytest.raises(Exception, match=error):
            await Cluster.start(config)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0)) + 1  # an embedding app's, as it had them
    finally:
        torch.set_num_threads(threads)


async def test_in_process_shards_past_the_memory_available_are_refused_before_the_load(monkeypatch):
    """Each in-process shard's --kv-memory passes on its own, but they pre-fault their pools at once: more in all than
    the host can give now is refused before the weights load, rather than the server being OOM-killed."""
    import fastdecode.actors.cluster as cluster
    from fastdecode.actors.cluster import Cluster

    monkeypatch.setattr(cluster, "available_memory_bytes", lambda: 100 << 20)
    monkeypatch.setattr(cluster, "load_model", lambda *a, **k: pytest.fail("the weights were loaded first"))
    config = ClusterConfig(model="random:tiny", device="cpu", num_shards=4, shard_kv_memory_bytes=32 << 20)
    with pytest.raises(ValueError, match="4 in-process shards .* more memory than this host can give now"):
        await Cluster.start(config)


def test_the_prefix_cache_takes_at_most_a_tenth_of_a_gpu_pool_sized_from_memory():
    from fastdecode.actors.cluster import gpu_prefix_cache_bytes

    gib = 1 << 30
    assert gpu_prefix_cache_bytes(2 * gib, 60 * gib) == 2 * gib  # a large pool: the whole budget
    assert gpu_prefix_cache_bytes(2 * gib, 6 * gib) == 6 * gib // 10  # a small one keeps nine tenths
    assert gpu_prefix_cache_bytes(0, 60 * gib) == 0
    assert gpu_prefix_cache_bytes(2 * gib, -1) == 0


def test_a_shard_address_zeromq_cannot_connect_to_is_refused():
    """As fdctl's --shard: checked when the config is made, not when the first connect fails after loading."""
    for address, words in (("127.0.0.1:5555", "must start with tcp:// or ipc://"),
                           ("tcp://127.0.0.1:0", "give the port the shard daemon listens on")):
        with pytest.raises(ValueError, match=words):
            ClusterConfig(shard_addresses=(address,))
