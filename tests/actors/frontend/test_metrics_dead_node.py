"""A shard daemon killed with SIGKILL: once the server is idle again, /metrics reports the node down with no KV
bytes (not its last figures), and the survivor up."""
from __future__ import annotations

import asyncio
import signal
import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from daemons import shard_daemons
from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.frontend.metrics import FrontendMetrics
from fastdecode.actors.guarded_node import GuardedNode, NodeState
from fastdecode.actors.kv_nodes import NodeStats
from fastdecode.actors.request import SamplingParams

NODE_GAUGES = ("fastdecode_kv_used_bytes", "fastdecode_kv_capacity_bytes", "fastdecode_kv_node_up")


async def node_gauges(metrics: FrontendMetrics, cluster: Cluster) -> dict[str, dict[str, float]]:
    """{node: {gauge name: value}} from one scrape."""
    text = (await metrics.render(cluster)).decode()
    gauges: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in NODE_GAUGES:
                gauges.setdefault(sample.labels["node"], {})[sample.name] = sample.value
    return gauges


async def collect(stream) -> list:
    return [event async for event in stream]


async def until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := await predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


async def test_killed_shard_reports_down_and_holds_no_kv_once_idle():
    with shard_daemons(2, kv_memory="32MiB", extra_args=("--no-calibrate",)) as daemons:
        config = ClusterConfig(model="random:tiny", seed=0, dtype="float32", device="cpu",
                               shard_addresses=tuple(address for _, address in daemons),
                               heartbeat_interval_s=0.05, liveness=2)
        async with await Cluster.start(config) as cluster:
            metrics = FrontendMetrics("m")
            params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
            streams = [cluster.submit(list(range(3, 3 + 8 * (i + 1))), params) for i in range(4)]
            readers = asyncio.gather(*(collect(stream) for stream in streams))

            async def both_hold_kv():
                gauges = await node_gauges(metrics, cluster)
                return len(gauges) == 2 and all(g["fastdecode_kv_used_bytes"] > 0 for g in gauges.values())

            await until(both_hold_kv, 30, "KV on both nodes")  # the scrape saw the victim's bytes in use
            victim_id = daemons[0][1]
            daemons[0][0].send_signal(signal.SIGKILL)
            finished = await asyncio.wait_for(readers, 60)
            assert all(events[-1].finish_reason == "length" for events in finished)  # moved to the survivor
            gauges = await node_gauges(metrics, cluster)
            survivor_id = daemons[1][1]
            assert gauges[victim_id] == {"fastdecode_kv_used_bytes": 0, "fastdecode_kv_capacity_bytes": 0,
                                         "fastdecode_kv_node_up": 0}
            assert gauges[survivor_id]["fastdecode_kv_node_up"] == 1
            assert gauges[survivor_id]["fastdecode_kv_capacity_bytes"] > 0
            assert gauges[survivor_id]["fastdecode_kv_used_bytes"] == 0  # idle: every sequence ended


class FakeNode:
    is_host, can_attend_now = True, False

    def __init__(self, node_id: str, used: int) -> None:
        self.node_id, self.used = node_id, used

    async def stats(self) -> NodeStats:
        return NodeStats(capacity_bytes=1000, used_bytes=self.used, page_size=16, num_total_pages=10,
                         num_sequences=1, attn_gbps=None)


async def test_draining_node_is_down_with_its_bytes_and_a_vanished_node_reports_zero():
    draining, leaving = GuardedNode(FakeNode("d", 300), epoch=1), GuardedNode(FakeNode("x", 500), epoch=1)
    draining.mark(NodeState.DRAINING, "SIGTERM")
    executor = SimpleNamespace(num_waiting=0, num_running=0, last_step_s=0.0, num_steps=0, num_recovered=0,
                               num_preempted=0, prefills=SimpleNamespace(cache=None),
                               nodes=[draining, leaving])
    metrics, cluster = FrontendMetrics("m"), SimpleNamespace(executor=executor)
    assert (await node_gauges(metrics, cluster))["x"]["fastdecode_kv_node_up"] == 1
    executor.nodes = [draining]  # "x" is no longer one of the Executor's nodes
    gauges = await node_gauges(metrics, cluster)
    assert gauges["d"] == {"fastdecode_kv_used_bytes": 300, "fastdecode_kv_capacity_bytes": 1000,
                           "fastdecode_kv_node_up": 0}
    assert gauges["x"] == {"fastdecode_kv_used_bytes": 0, "fastdecode_kv_capacity_bytes": 0,
                           "fastdecode_kv_node_up": 0}
