"""Read a live server's ``/metrics`` with prometheus-client's own parser."""
from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as ``{(name, sorted labels): value}``."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
