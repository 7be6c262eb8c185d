"""Prometheus metrics of one Frontend, on its own registry.

What follows vLLM's v1 ``PrometheusStatLogger``: each series' meaning and unit, the histograms' buckets
(e2e latency to 7680 s, time to first token to 2560 s, token counts in 1-2-5 steps), the
``finished_reason`` values (stop, length, abort, error; every one exists at 0 from the start) and a
``model_name`` label (the served model name) on every series, which vLLM's Grafana dashboard filters on.
Each series vLLM also has is exposed twice, as ``fastdecode_*`` and under vLLM's own name (``vllm:*``,
``VLLM_NAMES``), so a vLLM dashboard or alert reads this server unchanged. What differs: no ``engine`` label
(one engine); the
token-count buckets go on to 10^6 rather than stopping at max_model_len (the metrics exist before the
engine that knows it; the buckets past it stay equal to +Inf, so quantiles are the same); and the KV
series per node (``kv_*_bytes``, ``kv_node_up``), steps and recovered sequences, which vLLM has not.

Counters and histograms move as requests run; the engine gauges (queue,
running sequences, KV bytes per node, node liveness, step time) are read at
scrape time.  Every KV node the Executor holds (or once held) keeps its series:
a node that is down reports ``kv_node_up 0`` and 0 KV bytes, rather than its
series vanishing, so ``sum()`` over nodes counts only what can serve and an
alert on ``kv_node_up == 0`` has a series to fire on.  The registry also
carries prometheus-client's process, platform and GC collectors.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, generate_latest)
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from fastdecode.actors.guarded_node import GuardedNode

FINISH_REASONS = ("stop", "length", "abort", "error")  # vLLM's FinishReason values

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)
_MAX_COUNT_BUCKET = 1_000_000


def count_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's 1-2-5 buckets of token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


CONTENT_TYPE = CONTENT_TYPE_LATEST
_PREFIX, _VLLM_PREFIX = "fastdecode_", "vllm:"
# the series vLLM's v1 PrometheusStatLogger has, by our name: each is exposed under vLLM's name too
VLLM_NAMES = frozenset({
    "fastdecode_request_success", "fastdecode_prompt_tokens", "fastdecode_generation_tokens",
    "fastdecode_time_to_first_token_seconds", "fastdecode_time_per_output_token_seconds",
    "fastdecode_e2e_request_latency_seconds", "fastdecode_request_prompt_tokens",
    "fastdecode_request_generation_tokens", "fastdecode_request_params_max_tokens", "fastdecode_request_params_n",
    "fastdecode_num_requests_waiting", "fastdecode_num_requests_running", "fastdecode_kv_cache_usage_perc",
    "fastdecode_num_preemptions", "fastdecode_prefix_cache_queries", "fastdecode_prefix_cache_hits"})


class VllmNamed:
    """A collector of the ``VLLM_NAMES`` series of ``metrics`` (their parent Counters, Gauges and Histograms) under
    vLLM's names: the same values at each scrape, ``fastdecode_`` read as ``vllm:``."""

    def __init__(self, metrics: list) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names are not checked against the registry's: they are ours with another prefix

    def collect(self):
        for metric in self._metrics:
            for family in metric.collect():
                renamed = Metric(_VLLM_PREFIX + family.name.removeprefix(_PREFIX), family.documentation, family.type)
                renamed.samples = [Sample(_VLLM_PREFIX + sample.name.removeprefix(_PREFIX), *sample[1:])
                                   for sample in family.samples]
                yield renamed

log = logging.getLogger(__name__)


class FrontendMetrics:
    """All metrics of one app; nothing lives in the global registry.  ``model_name``: the served model name,
    the value of every series' ``model_name`` label."""

    def __init__(self, model_name: str) -> None:
        if not isinstance(model_name, str):
            raise TypeError(f"model_name must be a str, got {model_name!r}")
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self._vllm_named: list = []  # the parents of the series vLLM has too (VLLM_NAMES)
        self.request_success = self._named(Counter(
            "fastdecode_request_success", "Requests that ended, by finish reason (stop, length, abort, error).",
            ["model_name", "finished_reason"], registry=r))
        for reason in FINISH_REASONS:  # every reason has its series from the start
            self.request_success.labels(model_name, reason)
        self.request_rejected = Counter(
            "fastdecode_request_rejected", "Requests refused before generating, by HTTP status code.",
            ["model_name", "status_code"], registry=r)
        self.prompt_tokens = self._counter("fastdecode_prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = self._counter("fastdecode_generation_tokens", "Generated tokens.")
        self.time_to_first_token = self._histogram(
            "fastdecode_time_to_first_token_seconds", "Time from arrival to the first token.", _TTFT_BUCKETS)
        self.time_per_output_token = self._histogram(
            "fastdecode_time_per_output_token_seconds", "Time between consecutive tokens of a request.",
            _TOKEN_BUCKETS)
        self.e2e_request_latency = self._histogram(
            "fastdecode_e2e_request_latency_seconds", "Time from arrival to the end of a request.", _E2E_BUCKETS)
        counts = count_buckets(_MAX_COUNT_BUCKET)
        self.request_prompt_tokens = self._histogram(
            "fastdecode_request_prompt_tokens", "Prompt tokens of each finished request.", counts)
        self.request_generation_tokens = self._histogram(
            "fastdecode_request_generation_tokens", "Generated tokens of each finished request.", counts)
        self.request_params_max_tokens = self._histogram(
            "fastdecode_request_params_max_tokens", "The max_tokens of each finished request.", counts)
        self.request_params_n = self._histogram(
            "fastdecode_request_params_n", "The n (samples per prompt) of each admitted prompt.", count_buckets(20))
        self.num_requests_waiting = self._gauge("fastdecode_num_requests_waiting", "Requests waiting to be admitted.")
        self.num_requests_running = self._gauge("fastdecode_num_requests_running", "Sequences in the decode batch.")
        self.kv_cache_usage_perc = self._gauge(
            "fastdecode_kv_cache_usage_perc", "KV-cache usage over the live KV nodes: 1 means 100 percent.")
        self.kv_used_bytes = Gauge("fastdecode_kv_used_bytes", "KV-cache bytes in use, per KV node.",
                                   ["model_name", "node"], registry=r)
        self.kv_capacity_bytes = Gauge("fastdecode_kv_capacity_bytes", "KV-cache capacity in bytes, per KV node.",
                                       ["model_name", "node"], registry=r)
        self.kv_node_up = Gauge("fastdecode_kv_node_up", "1 while a KV node takes work, 0 when dead, draining or "
                                "gone.", ["model_name", "node"], registry=r)
        self._node_ids: set[str] = set()  # every node id reported so far
        self.step_seconds = self._gauge("fastdecode_step_seconds", "Duration of the last engine step.")
        # counters of the Executor's own counts, moved on by what each grew since the last scrape
        self.steps = self._counter("fastdecode_steps", "Engine steps run since start.")
        self.sequences_recovered = self._counter(
            "fastdecode_sequences_recovered", "Sequences rebuilt on another KV node after theirs failed or drained.")
        self.preemptions = self._counter(
            "fastdecode_num_preemptions",
            "Sequences preempted because their KV node was full (vLLM's num_preemptions).")
        self.prefix_cache_queries = self._counter(
            "fastdecode_prefix_cache_queries", "Prompt tokens looked up in the prefix cache (vLLM's).")
        self.prefix_cache_hits = self._counter(
            "fastdecode_prefix_cache_hits", "Prompt tokens found in the prefix cache, not computed (vLLM's).")
        self._seen: dict = {self.steps: 0, self.sequences_recovered: 0, self.preemptions: 0,
                            self.prefix_cache_queries: 0, self.prefix_cache_hits: 0}
        r.register(VllmNamed(self._vllm_named))

    def _named(self, metric):
        """``metric`` itself, kept for its vLLM-named copy where vLLM has the series (``VLLM_NAMES``)."""
        if metric.describe()[0].name in VLLM_NAMES:
            self._vllm_named.append(metric)
        return metric

    def _counter(self, name: str, documentation: str):
        return self._named(Counter(name, documentation, ["model_name"], registry=self.registry)).labels(
            self.model_name)

    def _gauge(self, name: str, documentation: str):
        return self._named(Gauge(name, documentation, ["model_name"], registry=self.registry)).labels(
            self.model_name)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]):
        return self._named(Histogram(name, documentation, ["model_name"], buckets=buckets,
                                     registry=self.registry)).labels(self.model_name)

    # ---- per request ---------------------------------------------------------------------------
    def on_rejected(self, status: int) -> None:
        self.request_rejected.labels(self.model_name, str(status)).inc()

    def on_prefilled(self, num_prompt_tokens: int) -> None:
        """A request's prompt was prefilled (its first output came): vLLM counts prompt tokens then, so one
        cancelled while it waited, or refused, adds none."""
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_prompt_admitted(self, num_samples: int) -> None:
        """A prompt whose ``num_samples`` choices (its n) were all admitted."""
        self.request_params_n.observe(num_samples)

    def on_token(self, since_previous_s: float, *, is_first: bool) -> None:
        self.generation_tokens.inc()
        (self.time_to_first_token if is_first else self.time_per_output_token).observe(since_previous_s)

    def on_finished(self, finish_reason: str, e2e_s: float, *, num_prompt_tokens: int | None,
                    num_generation_tokens: int, max_tokens: int | None) -> None:
        """A request (one choice) ended: ``finish_reason`` one of FINISH_REASONS (abort: cancelled).  A count of
        None is not known (a request cancelled before its prompt was tokenized) and not observed, as vLLM leaves
        out a max_tokens it has not."""
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.e2e_request_latency.observe(e2e_s)
        if num_prompt_tokens is not None:
            self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)
        if max_tokens is not None:
            self.request_params_max_tokens.observe(max_tokens)

    # ---- at scrape time ------------------------------------------------------------------------
    async def render(self, cluster) -> bytes:
        """Refresh the engine gauges from ``cluster`` (None while starting) and render the text format."""
        if cluster is not None:
            executor = cluster.executor
            self.num_requests_waiting.set(executor.num_waiting)
            self.num_requests_running.set(executor.num_running)
            self.step_seconds.set(executor.last_step_s)
            cache = executor.prefills.cache
            counts = ((self.steps, executor.num_steps), (self.sequences_recovered, executor.num_recovered),
                      (self.preemptions, executor.num_preempted),
                      (self.prefix_cache_queries, cache.stats.queried_tokens if cache else 0),
                      (self.prefix_cache_hits, cache.stats.hit_tokens if cache else 0))
            for counter, count in counts:
                counter.inc(count - self._seen[counter])
                self._seen[counter] = count
            await self._render_nodes(executor.nodes)
        return generate_latest(self.registry)

    async def _render_nodes(self, nodes: list[GuardedNode]) -> None:
        """Liveness and KV bytes of each node, and the KV usage over the live ones. A dead node, and one no longer
        among the Executor's nodes, reports 0 used and 0 capacity (it holds nothing for us); a draining one is not
        up but reports what it still holds, down to 0 as its sequences move away."""
        answering = [node for node in nodes if node.is_answering]
        stats = await asyncio.gather(*(node.stats() for node in answering), return_exceptions=True)
        num_live_used = num_live_capacity = 0
        for node, node_stats in zip(answering, stats):
            if isinstance(node_stats, Exception):  # it failed mid-scrape: keep its last values until marked
                log.warning("metrics: no stats from KV node %s: %s", node.node_id, node_stats)
                continue
            self.kv_used_bytes.labels(self.model_name, node.node_id).set(node_stats.used_bytes)
            self.kv_capacity_bytes.labels(self.model_name, node.node_id).set(node_stats.capacity_bytes)
            if node.is_alive:
                num_live_used += node_stats.used_bytes
                num_live_capacity += node_stats.capacity_bytes
        self.kv_cache_usage_perc.set(num_live_used / num_live_capacity if num_live_capacity else 0.0)
        up_ids = {node.node_id for node in answering if node.is_alive}
        answering_ids = {node.node_id for node in answering}
        self._node_ids.update(node.node_id for node in nodes)
        for node_id in self._node_ids:
            self.kv_node_up.labels(self.model_name, node_id).set(1 if node_id in up_ids else 0)
            if node_id not in answering_ids:  # dead, or no longer among the Executor's nodes
                self.kv_used_bytes.labels(self.model_name, node_id).set(0)
                self.kv_capacity_bytes.labels(self.model_name, node_id).set(0)
