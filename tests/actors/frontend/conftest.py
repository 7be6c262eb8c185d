"""One live tiny-model server for the whole folder (it takes seconds to start)."""
from __future__ import annotations

import pytest

from live_server import TINY_ARGS, LiveServer

API_KEY = "test-key"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def tiny_server():
    """``random:tiny`` (float32, CPU, seed 0) with one in-process KVShard, behind ``--api-key test-key``,
    context 256, tool calls parsed as hermes writes them."""
    server = LiveServer(*TINY_ARGS, "--shards", "1", "--kv-memory", "256MiB", "--api-key", API_KEY,
                        "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "tiny",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield server
    assert server.stop() == 0, f"the server did not stop cleanly on SIGTERM:\n{server.log()}"


@pytest.fixture
def openai_client(tiny_server):
    openai = pytest.importorskip("openai")
    return openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
