"""A KV node that fails while /metrics is scraped costs its own gauges, not the scrape."""
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from fastdecode.actors.frontend.metrics import FrontendMetrics
from fastdecode.actors.guarded_node import GuardedNode
from fastdecode.actors.kv_nodes import NodeStats
from fastdecode.actors.prefix_cache import PrefixCache


class Node:
    is_host = True
    can_attend_now = False

    def __init__(self, node_id, used, fails=False):
        self.node_id, self.used, self.fails = node_id, used, fails

    async def stats(self):
        if self.fails:
            raise ConnectionError("peer dead")
        return NodeStats(capacity_bytes=1000, used_bytes=self.used, page_size=16, num_total_pages=10,
                         num_sequences=1, attn_gbps=None)


async def test_a_node_failing_mid_scrape_skips_only_its_gauges():
    executor = SimpleNamespace(num_waiting=2, num_running=3, last_step_s=0.01, num_steps=7, num_recovered=0,
                               num_preempted=0, prefills=SimpleNamespace(cache=None),
                               nodes=[GuardedNode(Node("a", 100), epoch=1),
                                      GuardedNode(Node("b", 200, fails=True), epoch=1)])
    text = (await FrontendMetrics("m").render(SimpleNamespace(executor=executor))).decode()
    samples = {(s.name, s.labels.get("node")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("fastdecode_kv_used_bytes", "a")] == 100
    assert ("fastdecode_kv_used_bytes", "b") not in samples
    assert samples[("fastdecode_num_requests_running", None)] == 3


async def test_engine_counts_are_prometheus_counters():
    """Steps, recovered and preempted sequences only grow: counters (``_total``, for rate()), not gauges."""
    metrics = FrontendMetrics("m")
    executor = SimpleNamespace(num_waiting=0, num_running=0, last_step_s=0.0, num_steps=7, num_recovered=2,
                               num_preempted=1, prefills=SimpleNamespace(cache=None), nodes=[])
    await metrics.render(SimpleNamespace(executor=executor))
    executor.num_steps, executor.num_recovered, executor.num_preempted = 10, 2, 4
    families = {f.name: f for f in text_string_to_metric_families(
        (await metrics.render(SimpleNamespace(executor=executor))).decode())}
    assert families["fastdecode_steps"].type == "counter"
    assert [s.value for s in families["fastdecode_steps"].samples if s.name == "fastdecode_steps_total"] == [10]
    assert [s.value for s in families["fastdecode_sequences_recovered"].samples
            if s.name == "fastdecode_sequences_recovered_total"] == [2]
    assert [s.value for s in families["fastdecode_num_preemptions"].samples
            if s.name == "fastdecode_num_preemptions_total"] == [4]


async def test_prefix_cache_tokens_are_counters_under_vllm_names_too():
    metrics = FrontendMetrics("m")
    cache = PrefixCache(1 << 20, 4)
    executor = SimpleNamespace(num_waiting=0, num_running=0, last_step_s=0.0, num_steps=0, num_recovered=0,
                               num_preempted=0, prefills=SimpleNamespace(cache=cache), nodes=[])
    await metrics.render(SimpleNamespace(executor=executor))
    cache.stats.queried_tokens, cache.stats.hit_tokens = 100, 64
    samples = {s.name: s.value for f in text_string_to_metric_families(
        (await metrics.render(SimpleNamespace(executor=executor))).decode()) for s in f.samples}
    assert samples["fastdecode_prefix_cache_queries_total"] == samples["vllm:prefix_cache_queries_total"] == 100
    assert samples["fastdecode_prefix_cache_hits_total"] == samples["vllm:prefix_cache_hits_total"] == 64


class Client:
    """A shard's heartbeat client, counting how often its liveness is read."""

    def __init__(self, is_alive):
        self._is_alive, self.num_reads = is_alive, 0

    @property
    def is_alive(self):
        self.num_reads += 1
        return self._is_alive


class ShardNode(Node):
    def __init__(self, node_id, used, client):
        super().__init__(node_id, used)
        self.client = client


async def test_a_silent_shard_is_down_at_once_and_each_node_is_asked_once():
    """A shard whose heartbeats stopped is not answering before the Executor marks it dead; a scrape asks each
    node once whether it answers."""
    silent, heard = Client(is_alive=False), Client(is_alive=True)
    nodes = [GuardedNode(ShardNode("s", 300, silent), epoch=1), GuardedNode(ShardNode("h", 200, heard), epoch=1),
             GuardedNode(Node("local", 100), epoch=1)]
    assert [node.is_answering for node in nodes] == [False, True, True]
    assert nodes[0].is_alive  # not marked yet: the Executor notices at its next step boundary
    silent.num_reads = heard.num_reads = 0
    executor = SimpleNamespace(num_waiting=0, num_running=0, last_step_s=0.0, num_steps=0, num_recovered=0,
                               num_preempted=0, prefills=SimpleNamespace(cache=None), nodes=nodes)
    text = (await FrontendMetrics("m").render(SimpleNamespace(executor=executor))).decode()
    samples = {(s.name, s.labels.get("node")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert [samples[("fastdecode_kv_node_up", n)] for n in ("s", "h", "local")] == [0, 1, 1]
    assert [samples[("fastdecode_kv_used_bytes", n)] for n in ("s", "h", "local")] == [0, 200, 100]
    assert (silent.num_reads, heard.num_reads) == (1, 1)
    nodes[0].refresh()
    assert not nodes[0].is_alive and not nodes[0].is_answering and nodes[1].is_alive
