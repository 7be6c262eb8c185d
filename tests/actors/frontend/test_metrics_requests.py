"""What /metrics tells a vLLM dashboard about requests: the model_name label, vLLM's buckets, every finish
reason from the start, aborts before the first token, the per-request histograms, the KV usage fraction, the
process collectors, and the one log line per finished request.  No engine: stand-ins play the outputs."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from app_client import ScriptedLLM
from fastdecode.actors.frontend.generation import start_generation, start_generations
from fastdecode.actors.frontend.metrics import VLLM_NAMES, FrontendMetrics, count_buckets
from fastdecode.actors.frontend.openai_request import GenerateRequest
from fastdecode.actors.frontend.state import STATE
from fastdecode.actors.guarded_node import GuardedNode, NodeState
from metrics_scrape import samples_of
from test_metrics_nodes import Node

MODEL = "my-model"
PROMPT = (5, 6, 7, 8, 9)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]


def upper_bounds(samples: dict, name: str) -> list[float]:
    return sorted(float(dict(labels)["le"]) for n, labels in samples if n == f"{name}_bucket")


class QueuedLLM(ScriptedLLM):
    """An engine whose requests wait in its queue forever: no first token ever comes."""

    def stream(self, prompt_ids, params):
        self.seeds.append(params.seed)
        return self._queued()

    submit = stream

    async def _queued(self):
        self.num_open += 1
        try:
            await asyncio.Event().wait()
            yield  # never reached: makes this an async generator
        finally:
            self.num_open -= 1


async def test_every_series_has_the_model_name_and_every_reason_exists_at_start():
    samples = await samples_of(FrontendMetrics(MODEL))
    ours = [(name, dict(labels)) for name, labels in samples if name.startswith("fastdecode_")]
    assert ours and all(labels.get("model_name") == MODEL for _, labels in ours)
    for reason in ("stop", "length", "abort", "error"):
        assert value(samples, "fastdecode_request_success_total", finished_reason=reason) == 0


async def test_buckets_are_vllms():
    samples = await samples_of(FrontendMetrics(MODEL))
    inf = float("inf")
    assert upper_bounds(samples, "fastdecode_e2e_request_latency_seconds")[-2:] == [7680.0, inf]
    assert upper_bounds(samples, "fastdecode_e2e_request_latency_seconds")[-7:-2] == [120, 240, 480, 960, 1920]
    assert upper_bounds(samples, "fastdecode_time_to_first_token_seconds")[-5:] == [80, 160, 640, 2560, inf]
    assert upper_bounds(samples, "fastdecode_time_per_output_token_seconds")[:2] == [0.01, 0.025]
    assert upper_bounds(samples, "fastdecode_time_per_output_token_seconds")[-2:] == [80, inf]
    assert upper_bounds(samples, "fastdecode_request_params_n") == [1, 2, 5, 10, 20, inf]
    assert count_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert upper_bounds(samples, "fastdecode_request_prompt_tokens")[:4] == [1, 2, 5, 10]


async def test_process_platform_and_gc_collectors_are_on_the_registry():
    names = {name for name, _ in await samples_of(FrontendMetrics(MODEL))}
    assert {"process_cpu_seconds_total", "python_info", "python_gc_objects_collected_total"} <= names


async def test_kv_cache_usage_is_used_over_capacity_of_live_nodes():
    """Dead and draining nodes are left out (vLLM's kv_cache_usage_perc: the fraction of the cache in use)."""
    dead, draining = GuardedNode(Node("c", 900), epoch=1), GuardedNode(Node("d", 50), epoch=1)
    dead.mark(NodeState.DEAD, "test")
    draining.mark(NodeState.DRAINING, "test")
    nodes = [GuardedNode(Node("a", 100), epoch=1), GuardedNode(Node("b", 300), epoch=1), dead, draining]
    executor = SimpleNamespace(num_waiting=0, num_running=0, last_step_s=0.0, num_steps=0, num_recovered=0,
                               num_preempted=0, prefills=SimpleNamespace(cache=None), nodes=nodes)
    samples = await samples_of(FrontendMetrics(MODEL), SimpleNamespace(executor=executor))
    assert value(samples, "fastdecode_kv_cache_usage_perc") == pytest.approx(0.2)


@pytest.mark.parametrize("num_samples", [1, 2])
async def test_a_request_cancelled_before_its_first_token_counts_as_abort(num_samples):
    """The client leaves while its request waits in the queue: vLLM counts an abort, with its e2e time and its prompt
    in the per-request histogram; prompt_tokens_total counts prefilled prompts only (vLLM's, at the first output)."""
    metrics, llm = FrontendMetrics(MODEL), QueuedLLM()
    request = GenerateRequest(model=None, prompt=PROMPT, max_tokens=9, num_samples=num_samples)

    async def client():
        async with start_generations(llm, metrics, request) as generations:
            for generation in generations:
                async for _ in generation.outputs():
                    pass

    task = asyncio.create_task(client())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    samples = await samples_of(metrics)
    assert value(samples, "fastdecode_request_success_total", finished_reason="abort") == num_samples
    assert value(samples, "fastdecode_e2e_request_latency_seconds_count") == num_samples
    assert value(samples, "fastdecode_prompt_tokens_total") == 0
    assert value(samples, "fastdecode_request_prompt_tokens_sum") == len(PROMPT) * num_samples
    assert value(samples, "fastdecode_request_generation_tokens_sum") == 0
    assert value(samples, "fastdecode_request_params_n_count") == 1
    assert value(samples, "fastdecode_request_params_n_sum") == num_samples
    assert llm.num_open == 0  # cancelled in the engine too


async def test_a_finished_request_fills_the_histograms_and_logs_one_line(caplog):
    metrics = FrontendMetrics(MODEL)
    request = GenerateRequest(model=None, prompt="Keep this prompt out of the logs", max_tokens=3)
    with caplog.at_level(logging.INFO, logger="fastdecode.frontend"):
        async with start_generation(ScriptedLLM(), metrics, request) as generation:
            async for _ in generation.outputs():
                pass
    samples = await samples_of(metrics)
    assert value(samples, "fastdecode_request_success_total", finished_reason="length") == 1
    assert value(samples, "fastdecode_request_generation_tokens_sum") == 3
    assert value(samples, "fastdecode_request_prompt_tokens_sum") == len(generation.prompt_ids)
    assert value(samples, "fastdecode_request_params_max_tokens_sum") == 3
    assert value(samples, "fastdecode_request_params_n_sum") == 1
    lines = [r.getMessage() for r in caplog.records
             if r.name == "fastdecode.frontend.requests" and "finished" in r.getMessage()]
    assert len(lines) == 1
    assert "request 1 " in lines[0] and "length" in lines[0]
    assert f"{len(generation.prompt_ids)} prompt tokens" in lines[0] and "3 completion tokens" in lines[0]
    assert "TTFT 0." in lines[0] and "e2e 0." in lines[0]
    assert "Keep this prompt" not in caplog.text


async def test_a_request_failing_mid_generation_is_one_error_not_also_a_rejection():
    """A non-streaming completion whose engine request fails after a token answers 500, and used to count twice:
    as a finished request with ``error`` and, through the error middleware, as a rejected one."""
    from app_client import app_client

    llm = ScriptedLLM(failing_seed=7)
    async with app_client(llm) as client:
        metrics = client.server.app[STATE].metrics
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "seed": 7})
        assert response.status == 500
        samples = await samples_of(metrics)
    errors = [v for (name, labels), v in samples.items()
              if name == "fastdecode_request_success_total" and ("finished_reason", "error") in labels]
    assert errors == [1]
    assert not [k for k, v in samples.items() if k[0] == "fastdecode_request_rejected_total" and v]


async def test_e2e_ends_when_the_request_finishes_not_when_its_response_is_written():
    """vLLM takes each request's e2e at its finish; the time the response took afterwards (building, writing to a
    slow client) used to count, and several choices all took the last one's end."""
    metrics = FrontendMetrics(MODEL)
    request = GenerateRequest(model=None, prompt=PROMPT, max_tokens=3)
    async with start_generation(ScriptedLLM(), metrics, request) as generation:
        async for _ in generation.outputs():
            pass
        await asyncio.sleep(0.5)  # the response is still being written
    e2e_s = value(await samples_of(metrics), "fastdecode_e2e_request_latency_seconds_sum")
    assert 0.02 <= e2e_s < 0.4


async def test_token_latencies_are_the_engines_not_the_readers():
    """A slow reader (a client whose socket backs up) used to show as slow tokens: outputs were timestamped when
    the response took them. They now carry the engine's time of each token (vLLM's engine timestamps)."""
    from fastdecode.actors.api import AsyncLLM
    from fastdecode.actors.cluster import ClusterConfig

    metrics = FrontendMetrics(MODEL)
    request = GenerateRequest(model=None, prompt=PROMPT, max_tokens=6, sampling={"temperature": 0.0})
    async with await AsyncLLM.start(ClusterConfig(model="random:tiny", dtype="float32", device="cpu",
                                                  num_shards=0)) as llm:
        async with start_generation(llm, metrics, request) as generation:
            async for _ in generation.outputs():
                await asyncio.sleep(0.2)  # the reader is slow; the engine is done in a few ms
    samples = await samples_of(metrics)
    assert value(samples, "fastdecode_time_per_output_token_seconds_count") == 5
    assert value(samples, "fastdecode_time_per_output_token_seconds_sum") < 0.4  # not 5 x 0.2 s
    assert value(samples, "fastdecode_e2e_request_latency_seconds_sum") < 0.6


async def test_the_series_vllm_has_are_exposed_under_vllms_names_too():
    """A vLLM dashboard's queries (``vllm:num_requests_running``, ``rate(vllm:generation_tokens_total[1m])``,
    ``vllm:e2e_request_latency_seconds_bucket``...) read the same values as the fastdecode series; ours alone
    (steps, KV bytes per node) have no vllm: name."""
    metrics = FrontendMetrics(MODEL)
    metrics.on_token(0.05, is_first=True)
    metrics.on_token(0.01, is_first=False)
    metrics.on_finished("length", 0.5, num_prompt_tokens=5, num_generation_tokens=2, max_tokens=2)
    samples = await samples_of(metrics)
    ours = {(name.removeprefix("fastdecode_"), labels): value for (name, labels), value in samples.items()
            if name.startswith("fastdecode_") and not name.endswith("_created")}
    theirs = {(name.removeprefix("vllm:"), labels): value for (name, labels), value in samples.items()
              if name.startswith("vllm:") and not name.endswith("_created")}
    assert theirs and all(ours[key] == value for key, value in theirs.items())
    families = {name.rsplit("_", 1)[0] if name.endswith(("_total", "_bucket", "_count", "_sum")) else name
                for name, _ in theirs}
    assert families == {name.removeprefix("fastdecode_") for name in VLLM_NAMES}
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 1
    assert value(samples, "vllm:generation_tokens_total") == 2
    assert value(samples, "vllm:time_to_first_token_seconds_bucket", le="0.06") == 1
    assert not any(name.startswith("vllm:") and "kv_node_up" in name or name == "vllm:steps_total"
                   for name, _ in samples)
