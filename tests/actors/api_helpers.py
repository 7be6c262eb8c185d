"""What the AsyncLLM tests share: the tiny engine's config, a prompt and a long request, polling until a condition
holds (tests/polling.py's ``until``, re-exported), whether the engine is idle (nothing running, waiting or held in
KV, no named request live) or becomes so, and an engine per test (``llm``)."""
from __future__ import annotations

import pytest
from polling import until  # noqa: F401 (re-exported: the API tests import it from here)

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.request import SamplingParams

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu", num_shards=0)
PROMPT = [318, 72, 101, 302, 111]  # "<|bos|>Hello"; greedy on random:tiny: "n", 217, "_", " h", "3", "L", "3", ...
LONG = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)  # runs well past any wait of the tests
THREAD_WAIT_S = 10.0  # a guard: a hung thread or call fails the test instead of holding the suite


async def is_idle(llm: AsyncLLM) -> bool:
    """Nothing running or waiting, no KV held, and no name held by a live request (``llm.named_requests``)."""
    executor = llm.cluster.executor
    return (executor.num_running == 0 and executor.num_waiting == 0 and await llm.cluster.kv_used_bytes() == [0]
            and len(llm.named_requests) == 0)


async def until_idle(llm: AsyncLLM, timeout_s: float = 0.5) -> None:
    """Waits until nothing runs or waits (fails after ``timeout_s``), then asserts ``is_idle``."""
    executor = llm.cluster.executor
    await until(lambda: executor.num_running == 0 and executor.num_waiting == 0, timeout_s=timeout_s)
    assert await is_idle(llm)


@pytest.fixture
async def llm():
    async with await AsyncLLM.start(**TINY) as started:  # a model name and ClusterConfig fields, as vLLM
        yield started
