"""vLLM's and OpenAI's smaller routes (``/version``, ``/ping``, ``GET /v1/models/{model}``) and aiohttp's own
refusals (405, 413, a WebSocket route without the upgrade) keeping their headers and text in the OpenAI shape."""
from __future__ import annotations

import importlib.metadata
import time

import pytest

from app_client import ScriptedLLM, app_client
from fastdecode.actors.frontend import FrontendConfig

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_version_and_ping_need_no_key():
    async with app_client(None, FrontendConfig(served_model_name="m", api_key=KEY)) as client:
        version = await client.get("/version")
        assert version.status == 200
        assert await version.json() == {"version": importlib.metadata.version("fastdecode")}
        for method in ("GET", "POST"):
            starting = await client.request(method, "/ping")
            assert starting.status == 503 and (await starting.json())["status"] == "starting"
    async with app_client(ScriptedLLM(), FrontendConfig(served_model_name="m", api_key=KEY)) as client:
        for method in ("GET", "POST"):
            ready = await client.request(method, "/ping")
            assert ready.status == 200 and await ready.json() == {"status": "ok"}


@pytest.mark.parametrize("name", ["m", "org/model-1"])
async def test_retrieve_model_and_its_created_time(name):
    before = int(time.time())
    async with app_client(ScriptedLLM(), FrontendConfig(served_model_name=name)) as client:
        listed = (await (await client.get("/v1/models")).json())["data"][0]
        retrieved = await client.get(f"/v1/models/{name}")
        assert retrieved.status == 200
        card = await retrieved.json()
        assert card == listed and card["id"] == name and card["object"] == "model"
        assert before <= card["created"] <= time.time()
        assert card["max_model_len"] == 512
        assert (card["owned_by"], card["root"], card["parent"]) == ("fastdecode", name, None)  # vLLM's card
        (permission,) = card["permission"]
        assert permission["object"] == "model_permission" and permission["id"].startswith("modelperm-")
        assert permission["allow_sampling"] and permission["allow_logprobs"] and not permission["allow_fine_tuning"]
        unknown = await client.get("/v1/models/gpt-4")
        assert unknown.status == 404
        error = (await unknown.json())["error"]
        assert error["code"] == "model_not_found" and "gpt-4" in error["message"]


async def test_openai_sdk_retrieves_the_model():
    openai = pytest.importorskip("openai")
    async with app_client(ScriptedLLM(), FrontendConfig(served_model_name="m", api_key=KEY)) as client:
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=KEY, max_retries=0, timeout=10)
        async with sdk:
            assert (await sdk.models.retrieve("m")).id == "m"
            with pytest.raises(openai.NotFoundError):
                await sdk.models.retrieve("other")


async def test_method_not_allowed_keeps_its_allow_header():
    async with app_client(ScriptedLLM()) as client:
        for path, allowed in (("/health", {"GET", "HEAD"}), ("/v1/completions", {"POST"})):
            response = await client.put(path, headers=AUTH)
            assert response.status == 405
            assert set(response.headers["Allow"].split(",")) == allowed
            error = (await response.json())["error"]
            assert set(error) == {"message", "type", "param", "code"} and path in error["message"]


async def test_body_too_large_says_so():
    async with app_client(ScriptedLLM()) as client:
        response = await client.post("/v1/completions", data=b"x" * ((16 << 20) + 1),
                                     headers={"Content-Type": "application/json"})
        assert response.status == 413
        message = (await response.json())["error"]["message"]
        assert "Maximum request body size 16777216 exceeded" in message


async def test_websocket_route_without_the_upgrade_says_why():
    async with app_client(ScriptedLLM()) as client:
        response = await client.get("/v1/stream")
        assert response.status == 400
        message = (await response.json())["error"]["message"]
        assert "Upgrade" in message and "WebSocket" in message


async def test_the_cards_root_is_the_model_as_given():
    config = FrontendConfig(served_model_name="chat", model="/models/SmolLM2-135M-Instruct")
    async with app_client(ScriptedLLM(), config) as client:
        card = (await (await client.get("/v1/models")).json())["data"][0]
        assert (card["id"], card["root"]) == ("chat", "/models/SmolLM2-135M-Instruct")
