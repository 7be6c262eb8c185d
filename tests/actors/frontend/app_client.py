"""An in-process Frontend app around a stand-in engine, for tests that need no real one."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from fastdecode.actors.frontend import FrontendConfig, FrontendState, build_app


@asynccontextmanager
async def app_client(llm: Any) -> AsyncIterator[TestClient]:
    """A test client of an app (served model name ``m``) with ``llm`` attached as its engine."""
    state = FrontendState(FrontendConfig(served_model_name="m"))
    state.llm = llm
    async with TestClient(TestServer(build_app(state))) as client:
        yield client
