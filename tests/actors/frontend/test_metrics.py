"""``/metrics`` parses with prometheus-client's parser and its counters move with traffic."""
from __future__ import annotations

import aiohttp

from conftest import API_KEY
from metrics_scrape import parse_samples

EXPECTED_FAMILIES = {
    "fastdecode_request_success_total", "fastdecode_request_rejected_total", "fastdecode_prompt_tokens_total",
    "fastdecode_generation_tokens_total", "fastdecode_time_to_first_token_seconds_count",
    "fastdecode_time_per_output_token_seconds_count", "fastdecode_e2e_request_latency_seconds_count",
    "fastdecode_num_requests_waiting", "fastdecode_num_requests_running", "fastdecode_kv_used_bytes",
    "fastdecode_kv_capacity_bytes", "fastdecode_step_seconds", "fastdecode_steps_total",
    "fastdecode_kv_cache_usage_perc", "fastdecode_request_prompt_tokens_count",
    "fastdecode_request_generation_tokens_count", "fastdecode_request_params_max_tokens_count",
    "fastdecode_request_params_n_count", "process_cpu_seconds_total", "python_gc_objects_collected_total",
    "python_info",
}
MODEL_NAME = "tiny"  # the live server's --served-model-name


async def scrape(url: str) -> dict:
    """Every sample, with its model_name label (which metrics_scrape.scrape leaves out)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as response:
            assert response.status == 200
            return parse_samples(await response.text())


def value(samples: dict, name: str, **labels: str) -> float:
    """A fastdecode series' value, of the served model."""
    return samples.get((name, tuple(sorted({"model_name": MODEL_NAME, **labels}.items()))), 0.0)


async def test_counters_move_with_traffic(tiny_server):
    before = await scrape(tiny_server.url)
    body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        async with session.post(tiny_server.url + "/v1/completions", json=body) as response:
            assert response.status == 200
        async with session.post(tiny_server.url + "/v1/completions", json={"prompt": 7}) as response:
            assert response.status == 400
    after = await scrape(tiny_server.url)
    assert EXPECTED_FAMILIES <= {name for name, _ in after}
    assert value(after, "fastdecode_prompt_tokens_total") - value(before, "fastdecode_prompt_tokens_total") == 5
    assert value(after, "fastdecode_generation_tokens_total") - value(
        before, "fastdecode_generation_tokens_total") == 7
    assert value(after, "fastdecode_request_success_total", finished_reason="length") - value(
        before, "fastdecode_request_success_total", finished_reason="length") == 1
    assert value(after, "fastdecode_request_rejected_total", status_code="400") - value(
        before, "fastdecode_request_rejected_total", status_code="400") == 1
    assert value(after, "fastdecode_time_to_first_token_seconds_count") - value(
        before, "fastdecode_time_to_first_token_seconds_count") == 1
    assert value(after, "fastdecode_time_per_output_token_seconds_count") - value(
        before, "fastdecode_time_per_output_token_seconds_count") == 6
    assert value(after, "fastdecode_steps_total") > value(before, "fastdecode_steps_total")
    for name in ("request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens"):
        assert value(after, f"fastdecode_{name}_count") - value(before, f"fastdecode_{name}_count") == 1
    assert value(after, "fastdecode_request_generation_tokens_sum") - value(
        before, "fastdecode_request_generation_tokens_sum") == 7
    capacities = [v for (name, _), v in after.items() if name == "fastdecode_kv_capacity_bytes"]
    assert capacities and all(c > 0 for c in capacities)
    assert 0 <= value(after, "fastdecode_kv_cache_usage_perc") <= 1


async def test_every_fastdecode_series_names_the_served_model(tiny_server):
    samples = await scrape(tiny_server.url)
    ours = [labels for name, labels in samples if name.startswith("fastdecode_")]
    assert ours and all(dict(labels).get("model_name") == MODEL_NAME for labels in ours)
