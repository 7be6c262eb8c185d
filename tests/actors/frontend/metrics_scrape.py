"""Read ``/metrics`` with prometheus-client's own parser: a live server's (``scrape``), or a FrontendMetrics'
(``samples_of``)."""
from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from fastdecode.actors.frontend.metrics import FrontendMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # {(name, sorted labels): value}


def parse_samples(text: str, *, is_model_name_kept: bool = True) -> Samples:
    """Every sample of a /metrics text as ``{(name, sorted labels): value}``; ``is_model_name_kept`` False leaves out
    the ``model_name`` label every fastdecode series carries (one served model)."""
    return {(sample.name, tuple(sorted((k, v) for k, v in sample.labels.items()
                                       if is_model_name_kept or k != "model_name"))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def samples_of(metrics: FrontendMetrics, cluster=None, *, is_model_name_kept: bool = True) -> Samples:
    """``parse_samples`` of what ``metrics`` renders (the nodes' series from ``cluster`` where given)."""
    return parse_samples((await metrics.render(cluster)).decode(), is_model_name_kept=is_model_name_kept)


async def scrape(url: str) -> Samples:
    """Every sample of a live server, less the ``model_name`` label (its name is checked in test_metrics.py)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
    return parse_samples(text, is_model_name_kept=False)


ABORTED = ("fastdecode_request_success_total", (("finished_reason", "abort"),))


def is_freed(samples: dict) -> bool:
    """No request running and no KV in use on the (one) KV node."""
    kv_used = [v for (name, _), v in samples.items() if name == "fastdecode_kv_used_bytes"]
    return samples[("fastdecode_num_requests_running", ())] == 0 and kv_used == [0]


async def until_aborted_and_freed(url: str, num_aborted: float, num_tries: int = 250) -> dict:
    """Scrape until ``num_aborted`` requests in all were aborted and everything is freed; the last scrape
    (the server notices a client leave, cancels, and the next step frees the KV)."""
    for _ in range(num_tries):
        after = await scrape(url)
        if after.get(ABORTED, 0) == num_aborted and is_freed(after):
            break
        await asyncio.sleep(0.02)
    return after
