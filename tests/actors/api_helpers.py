"""What the AsyncLLM tests share: the tiny engine's config, a prompt and a long request, polling until a condition
holds, whether the engine is idle (nothing running, waiting or held in KV), and an engine per test (``llm``)."""
from __future__ import annotations

import asyncio

import pytest

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.request import SamplingParams

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu", num_shards=0)
PROMPT = [318, 72, 101, 302, 111]  # "<|bos|>Hello"; greedy on random:tiny: "n", 217, "_", " h", "3", "L", "3", ...
LONG = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)  # runs well past any wait of the tests
THREAD_WAIT_S = 10.0  # a guard: a hung thread or call fails the test instead of holding the suite


async def until(condition, timeout_s: float = 2.0) -> float:
    """Seconds until ``condition()`` held (polled on the loop); fails after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        assert loop.time() - start < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.005)
    return loop.time() - start


async def is_idle(llm: AsyncLLM) -> bool:
    executor = llm.cluster.executor
    return executor.num_running == 0 and executor.num_waiting == 0 and await llm.cluster.kv_used_bytes() == [0]


@pytest.fixture
async def llm():
    async with await AsyncLLM.start(**TINY) as started:  # a model name and ClusterConfig fields, as vLLM
        yield started
