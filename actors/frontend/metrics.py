"""Prometheus metrics of one Frontend, on its own registry (names follow vLLM's).

Counters and histograms move as requests run; the engine gauges (queue,
running sequences, KV bytes per node, node liveness, step time) are read at
scrape time.  Every KV node the Executor holds (or once held) keeps its series:
a node that is down reports ``kv_node_up 0`` and 0 KV bytes, rather than its
series vanishing, so ``sum()`` over nodes counts only what can serve and an
alert on ``kv_node_up == 0`` has a series to fire on.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fastdecode.actors.guarded_node import GuardedNode

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                  0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class FrontendMetrics:
    """All metrics of one app; nothing lives in the global registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_success = Counter(
            "fastdecode_request_success", "Requests that ended, by finish reason (stop, length, abort, error).",
            ["finished_reason"], registry=r)
        self.request_rejected = Counter(
            "fastdecode_request_rejected", "Requests refused before generating, by HTTP status code.",
            ["status_code"], registry=r)
        self.prompt_tokens = Counter("fastdecode_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("fastdecode_generation_tokens", "Generated tokens.", registry=r)
        self.time_to_first_token = Histogram(
            "fastdecode_time_to_first_token_seconds", "Time from arrival to the first token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "fastdecode_time_per_output_token_seconds", "Time between consecutive tokens of a request.",
            buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "fastdecode_e2e_request_latency_seconds", "Time from arrival to the last token.",
            buckets=_E2E_BUCKETS, registry=r)
        self.num_requests_waiting = Gauge("fastdecode_num_requests_waiting", "Requests waiting to be admitted.",
                                          registry=r)
        self.num_requests_running = Gauge("fastdecode_num_requests_running", "Sequences in the decode batch.",
                                          registry=r)
        self.kv_used_bytes = Gauge("fastdecode_kv_used_bytes", "KV-cache bytes in use, per KV node.", ["node"],
                                   registry=r)
        self.kv_capacity_bytes = Gauge("fastdecode_kv_capacity_bytes", "KV-cache capacity in bytes, per KV node.",
                                       ["node"], registry=r)
        self.kv_node_up = Gauge("fastdecode_kv_node_up", "1 while a KV node takes work, 0 when dead, draining or "
                                "gone.", ["node"], registry=r)
        self._node_ids: set[str] = set()  # every node id reported so far
        self.step_seconds = Gauge("fastdecode_step_seconds", "Duration of the last engine step.", registry=r)
        # counters of the Executor's own counts, moved on by what each grew since the last scrape
        self.steps = Counter("fastdecode_steps", "Engine steps run since start.", registry=r)
        self.sequences_recovered = Counter(
            "fastdecode_sequences_recovered",
            "Sequences rebuilt on another KV node after theirs failed or drained.", registry=r)
        self.preemptions = Counter(
            "fastdecode_num_preemptions",
            "Sequences preempted because their KV node was full (vLLM's num_preemptions).", registry=r)
        self._seen: dict[Counter, int] = {self.steps: 0, self.sequences_recovered: 0, self.preemptions: 0}

    # ---- per request ---------------------------------------------------------------------------
    def on_rejected(self, status: int) -> None:
        self.request_rejected.labels(status_code=str(status)).inc()

    def on_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_token(self, since_previous_s: float, *, is_first: bool) -> None:
        self.generation_tokens.inc()
        (self.time_to_first_token if is_first else self.time_per_output_token).observe(since_previous_s)

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        self.request_success.labels(finished_reason=finish_reason).inc()
        self.e2e_request_latency.observe(e2e_s)

    # ---- at scrape time ------------------------------------------------------------------------
    async def render(self, cluster) -> bytes:
        """Refresh the engine gauges from ``cluster`` (None while starting) and render the text format."""
        if cluster is not None:
            executor = cluster.executor
            self.num_requests_waiting.set(executor.num_waiting)
            self.num_requests_running.set(executor.num_running)
            self.step_seconds.set(executor.last_step_s)
            counts = ((self.steps, executor.num_steps), (self.sequences_recovered, executor.num_recovered),
                      (self.preemptions, executor.num_preempted))
            for counter, count in counts:
                counter.inc(count - self._seen[counter])
                self._seen[counter] = count
            await self._render_nodes(executor.nodes)
        return generate_latest(self.registry)

    async def _render_nodes(self, nodes: list[GuardedNode]) -> None:
        """Liveness and KV bytes of each node. A dead node, and one no longer among the Executor's nodes, reports
        0 used and 0 capacity (it holds nothing for us); a draining one is not up but reports what it still
        holds, down to 0 as its sequences move away."""
        answering = [node for node in nodes if node.is_answering]
        stats = await asyncio.gather(*(node.stats() for node in answering), return_exceptions=True)
        for node, node_stats in zip(answering, stats):
            if isinstance(node_stats, Exception):  # it failed mid-scrape: keep its last values until marked
                log.warning("metrics: no stats from KV node %s: %s", node.node_id, node_stats)
                continue
            self.kv_used_bytes.labels(node=node.node_id).set(node_stats.used_bytes)
            self.kv_capacity_bytes.labels(node=node.node_id).set(node_stats.capacity_bytes)
        up_ids = {node.node_id for node in answering if node.is_alive}
        answering_ids = {node.node_id for node in answering}
        self._node_ids.update(node.node_id for node in nodes)
        for node_id in self._node_ids:
            self.kv_node_up.labels(node=node_id).set(1 if node_id in up_ids else 0)
            if node_id not in answering_ids:  # dead, or no longer among the Executor's nodes
                self.kv_used_bytes.labels(node=node_id).set(0)
                self.kv_capacity_bytes.labels(node=node_id).set(0)

