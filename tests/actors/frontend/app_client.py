"""An in-process Frontend app around a stand-in engine, for tests that need no real one."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from fastdecode.actors.api import StreamOutput
from fastdecode.actors.frontend import FrontendConfig, FrontendState, build_app
from fastdecode.actors.model.config import SamplingDefaults
from fastdecode.actors.request import SamplingParams
from synthetic_tokenizers import synthetic_tokenizer

TOKEN_ID = 72  # what ScriptedLLM plays ("H")


@asynccontextmanager
async def app_client(llm: Any, config: FrontendConfig | None = None) -> AsyncIterator[TestClient]:
    """A test client of an app (by default: served model name ``m``, no key) with ``llm`` (or none: still
    starting) attached as its engine."""
    state = FrontendState(config or FrontendConfig(served_model_name="m"))
    if llm is not None:
        state.llm = llm
    async with TestClient(TestServer(build_app(state))) as client:
        yield client


class ScriptedLLM:
    """What the routes use of an ``AsyncLLM``; ``stream`` plays token ``TOKEN_ID`` every 10 ms, and the sample
    with seed ``failing_seed`` fails after its first token.  ``num_open`` counts the streams not yet closed."""

    def __init__(self, failing_seed: int | None = None) -> None:
        self.tokenizer = synthetic_tokenizer()
        self.max_model_len, self.max_num_choices, self.max_logprobs = 512, 8, 20
        self.model_config = SimpleNamespace(sampling_defaults=SamplingDefaults(), vocab_size=self.tokenizer.vocab_size)
        self.cluster = SimpleNamespace(executor=SimpleNamespace(has_live_node=True))  # what /health asks
        self.failing_seed = failing_seed
        self.seeds: list[int | None] = []
        self.num_open = 0

    def stream(self, prompt_ids: list[int], params: SamplingParams):
        self.seeds.append(params.seed)
        return self._stream(params)

    submit = stream  # several choices are submitted at once (AsyncLLM.submit); nothing here refuses

    async def _stream(self, params: SamplingParams):
        self.num_open += 1
        try:
            for index in range(params.max_tokens):
                await asyncio.sleep(0.01)
                if params.seed is not None and params.seed == self.failing_seed and index == 1:
                    yield StreamOutput(1, -1, "", finish_reason="error", error="the shard broke")
                    return
                yield StreamOutput(1, TOKEN_ID, "H", finish_reason="length" if index == params.max_tokens - 1 else None)
        finally:
            self.num_open -= 1
