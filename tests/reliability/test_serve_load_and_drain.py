"""``fdctl serve`` under 256 concurrent requests (all complete, KV back to zero, memory flat across rounds)
and its graceful stop on SIGTERM (running requests finish, new ones get 503, exit 0)."""
from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from serve_helpers import TINY_ARGS, LiveServer, metric_values, rss_bytes

NUM_CONCURRENT = 256
NUM_ROUNDS = 4  # the first one warms up
MAX_RSS_GROWTH = 0.05


async def complete(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


@pytest.mark.slow
async def test_256_concurrent_requests_complete_and_memory_stays_flat():
    with LiveServer(*TINY_ARGS, "--shards", "1", "--kv-memory", "128MiB", "--max-model-len", "128") as server:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            rss = []
            for round_index in range(NUM_ROUNDS):
                results = await asyncio.gather(*(
                    complete(session, server.url, f"request {i} of round {round_index}:", 4 + i % 8)
                    for i in range(NUM_CONCURRENT)))
                for i, result in enumerate(results):
                    assert result["choices"][0]["finish_reason"] == "length"
                    assert result["usage"]["completion_tokens"] == 4 + i % 8
                async with session.get(f"{server.url}/metrics") as response:
                    metrics = await response.text()
                used = metric_values(metrics, "fastdecode_kv_used_bytes")
                assert used and all(u == 0 for u in used), used
                assert metric_values(metrics, "fastdecode_num_requests_running") == [0]
                rss.append(rss_bytes(server.process.pid))
        growth = max(rss[1:]) / rss[0] - 1
        print(f"RSS after each round (MiB): {[round(r / 2**20, 1) for r in rss]}; growth after warm-up "
              f"{growth * 100:.2f} %")
        assert growth < MAX_RSS_GROWTH
    assert server.process.returncode == 0


@pytest.mark.slow
async def test_sigterm_lets_running_requests_finish_refuses_new_ones_and_exits_0():
    max_tokens = 400
    server = LiveServer(*TINY_ARGS, "--shards", "1", "--kv-memory", "64MiB", "--max-model-len", "512",
                        "--drain-timeout", "60")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            body = {"prompt": "drain me", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            async with session.post(f"{server.url}/v1/completions", json=body) as response:
                assert response.status == 200
                finish_reason, num_chunks = None, 0
                is_refused_seen = False
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: {"):
                        continue
                    num_chunks += 1
                    finish_reason = json.loads(line[6:])["choices"][0]["finish_reason"] or finish_reason
                    if num_chunks == 5:
                        server.process.send_signal(signal.SIGTERM)
                    if num_chunks == 20:  # draining now: the running stream goes on, a new request is refused
                        async with session.post(f"{server.url}/v1/completions",
                                                json={"prompt": "late", "max_tokens": 2}) as late:
                            assert late.status == 503, await late.text()
                        async with session.get(f"{server.url}/health") as health:
                            assert health.status == 503 and (await health.json())["status"] == "draining"
                        is_refused_seen = True
        assert is_refused_seen and finish_reason == "length"
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
    assert "draining: 1 request(s) to finish" in server.log()
