"""The access log: one INFO line per HTTP request on ``fastdecode.frontend.access`` (client, method, path without
its query string, status, bytes, seconds), never a query string or a header; none with ``is_access_logged`` off.
A scripted engine stands in for the cluster; the live check reads the shared server's stderr."""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from app_client import ScriptedLLM
from conftest import API_KEY
from fastdecode.actors.frontend import FrontendConfig, FrontendState, build_app
from fastdecode.actors.frontend.server import ACCESS_LOG_NAME, app_runner

SECRET = "s3cret-in-the-url"
HEADER_SECRET = "s3cret-in-a-header"
LINE = re.compile(r'(\S+) "(\S+) (\S+)" (\d{3}) (\d+) (\d+\.\d{3})')


@asynccontextmanager
async def running_app(*, is_access_logged: bool) -> AsyncIterator[str]:
    """The app with a scripted engine, served by ``app_runner`` on a free loopback port; yields its URL."""
    state = FrontendState(FrontendConfig(served_model_name="m"))
    state.llm = ScriptedLLM()
    runner = app_runner(build_app(state), is_access_logged=is_access_logged)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _requests(url: str) -> None:
    headers = {"Authorization": f"Bearer {HEADER_SECRET}", "User-Agent": HEADER_SECRET}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{url}/v1/models?token={SECRET}&x=1") as response:
            assert response.status == 200
        async with session.post(f"{url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 3}) as response:
            assert response.status == 200 and (await response.json())["choices"][0]["text"] == "HHH"
        async with session.get(f"{url}/no/such%0Aroute?token={SECRET}") as response:
            assert response.status == 404


async def test_each_request_leaves_one_line_without_query_or_headers(caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOG_NAME)
    async with running_app(is_access_logged=True) as url:
        await _requests(url)
    lines = [record.getMessage() for record in caplog.records if record.name == ACCESS_LOG_NAME]
    assert all(record.levelno == logging.INFO for record in caplog.records if record.name == ACCESS_LOG_NAME)
    assert len(lines) == 3, lines
    fields = [LINE.fullmatch(line) for line in lines]
    assert all(fields), lines
    assert [match.group(1) for match in fields] == ["127.0.0.1"] * 3
    assert [(m.group(2), m.group(3), m.group(4)) for m in fields] == [
        ("GET", "/v1/models", "200"), ("POST", "/v1/completions", "200"), ("GET", "/no/such%0Aroute", "404")]
    assert all(int(match.group(5)) > 0 for match in fields)  # every answer has a body
    assert all(0 <= float(match.group(6)) < 10 for match in fields)
    assert not any(SECRET in line or HEADER_SECRET in line or "?" in line for line in lines)


async def test_no_line_when_the_access_log_is_off(caplog):
    caplog.set_level(logging.DEBUG)
    async with running_app(is_access_logged=False) as url:
        await _requests(url)
    assert [record for record in caplog.records if record.name == ACCESS_LOG_NAME] == []


async def test_no_line_below_the_level(caplog):
    """At ``--log-level warning`` the access lines (INFO) are not even formatted."""
    caplog.set_level(logging.WARNING)
    async with running_app(is_access_logged=True) as url:
        await _requests(url)
    assert [record for record in caplog.records if record.name == ACCESS_LOG_NAME] == []


async def test_a_client_that_leaves_a_stream_leaves_a_499_line(caplog):
    """aiohttp writes no access line for a handler cancelled because its client left; the middleware does."""
    caplog.set_level(logging.INFO, logger=ACCESS_LOG_NAME)
    async with running_app(is_access_logged=True) as url:
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{url}/v1/completions?token={SECRET}",
                                          json={"prompt": [5], "max_tokens": 300, "stream": True})
            assert response.status == 200
            await response.content.readline()  # the first chunk came: the stream (3 s long) is running
            response.close()
        for _ in range(100):
            lines = [record.getMessage() for record in caplog.records if record.name == ACCESS_LOG_NAME]
            if lines:
                break
            await asyncio.sleep(0.01)
    assert len(lines) == 1 and re.fullmatch(r'127\.0\.0\.1 "POST /v1/completions" 499 - (\d+\.\d{3})', lines[0]), lines
    assert float(lines[0].rsplit(" ", 1)[1]) < 2.0  # logged when the client left, not when the stream would end


async def test_the_live_server_logs_a_websocket_key_never(tiny_server):
    """``fdctl serve`` logs its requests by default; the WebSocket key given as ``?token=`` stays out."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{tiny_server.url}/v1/models?token={SECRET}",
                               headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status == 200
        async with session.ws_connect(f"{tiny_server.ws_url}?token={API_KEY}") as ws:
            await ws.close()
    for _ in range(100):  # the WebSocket's line comes once its handler has returned
        log = tiny_server.log()
        if '"GET /v1/stream"' in log:
            break
        await asyncio.sleep(0.02)
    assert re.search(r'127\.0\.0\.1 "GET /v1/models" 200 \d+ \d+\.\d{3}', log), log[-2000:]
    assert re.search(r'127\.0\.0\.1 "GET /v1/stream" 101 \d+ \d+\.\d{3}', log), log[-2000:]
    assert SECRET not in log and API_KEY not in log and "token=" not in log

