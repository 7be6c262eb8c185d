"""CORS as vLLM's ``--allowed-origins/-methods/-headers`` and ``--allow-credentials``: preflights answered before
the key is checked, allow headers on every response (errors and SSE streams included) to an allowed Origin and on
none to another, and the WebSocket refusing a browser's Origin outside the list before the upgrade."""
from __future__ import annotations

import aiohttp
import pytest

from app_client import ScriptedLLM, app_client
from fastdecode.actors.frontend import FrontendConfig

UI = "https://ui.example"
EVIL = "https://evil.example"
KEY = "k"
PREFLIGHT = {"Origin": UI, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
BODY = {"prompt": [5, 6], "max_tokens": 3}


def restricted(**fields) -> FrontendConfig:
    return FrontendConfig(served_model_name="m", api_key=KEY, allowed_origins=(UI,), **fields)


async def test_default_preflight_is_answered_without_the_key():
    async with app_client(None, FrontendConfig(served_model_name="m", api_key=KEY)) as client:
        response = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert response.status == 200, await response.text()
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in response.headers["Access-Control-Allow-Methods"].split(", ")
        assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert response.headers["Access-Control-Max-Age"] == "600"
        assert "Access-Control-Allow-Credentials" not in response.headers
        for path in ("/v1/completions", "/v1/nothing-here"):  # an error too carries the allow header
            refused = await client.post(path, json=BODY, headers={"Origin": EVIL})
            assert refused.status == 401
            assert refused.headers["Access-Control-Allow-Origin"] == "*"
        plain = await client.get("/version", headers={"Authorization": f"Bearer {KEY}"})
        assert "Access-Control-Allow-Origin" not in plain.headers  # no Origin: not a browser's cross-site call


async def test_allowed_origin_is_named_and_others_get_nothing():
    async with app_client(None, restricted(is_credentials_allowed=True)) as client:
        response = await client.options("/v1/completions", headers=PREFLIGHT)
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == UI
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in response.headers["Vary"]
        refused = await client.options("/v1/completions", headers={**PREFLIGHT, "Origin": EVIL})
        assert refused.status == 400
        assert (await refused.json())["error"]["code"] == "cors_refused"
        assert not [name for name in refused.headers if name.lower().startswith("access-control-")]
        auth = {"Authorization": f"Bearer {KEY}"}
        allowed = await client.get("/version", headers={**auth, "Origin": UI})
        assert allowed.status == 200 and allowed.headers["Access-Control-Allow-Origin"] == UI
        assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
        other = await client.get("/version", headers={**auth, "Origin": EVIL})
        assert other.status == 200
        assert not [name for name in other.headers if name.lower().startswith("access-control-")]


@pytest.mark.parametrize(("fields", "asked", "status"), [
    ({"allowed_methods": ("GET",)}, {"Access-Control-Request-Method": "POST"}, 400),
    ({"allowed_methods": ("get", "post")}, {"Access-Control-Request-Method": "POST"}, 200),
    ({"allowed_headers": ("authorization",)}, {"Access-Control-Request-Headers": "x-custom"}, 400),
    ({"allowed_headers": ("Authorization",)}, {"Access-Control-Request-Headers": "Authorization, Content-Type"}, 200),
], ids=["method-refused", "method-allowed", "header-refused", "header-allowed-with-safelisted"])
async def test_preflight_checks_method_and_headers(fields, asked, status):
    async with app_client(None, restricted(**fields)) as client:
        response = await client.options("/v1/completions", headers={**PREFLIGHT, **asked})
        assert response.status == status, await response.text()
        if status == 200 and "allowed_headers" in fields:
            listed = response.headers["Access-Control-Allow-Headers"].split(", ")
            assert "authorization" in listed and "content-type" in listed


async def test_stream_carries_the_allow_header():
    async with app_client(ScriptedLLM(), restricted()) as client:
        response = await client.post("/v1/completions", json={**BODY, "stream": True},
                                     headers={"Origin": UI, "Authorization": f"Bearer {KEY}"})
        assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == UI
        assert (await response.text()).rstrip().endswith("data: [DONE]")


async def test_websocket_refuses_a_disallowed_origin_before_the_upgrade():
    async with app_client(ScriptedLLM(), restricted()) as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/v1/stream", origin=EVIL, params={"token": KEY})
        assert refused.value.status == 403
        response = await client.get("/v1/stream", headers={"Origin": EVIL, "Authorization": f"Bearer {KEY}"})
        assert response.status == 403 and (await response.json())["error"]["code"] == "origin_not_allowed"
        for origin in (UI, None):  # the allowed page, and a client that is no browser
            async with client.ws_connect("/v1/stream", origin=origin, params={"token": KEY}) as ws:
                await ws.send_json(BODY)
                messages = [message.json() async for message in ws]
            assert [m["type"] for m in messages] == ["token"] * 3 + ["done"]


async def test_websocket_takes_any_origin_by_default():
    async with app_client(ScriptedLLM()) as client:
        async with client.ws_connect("/v1/stream", origin=EVIL) as ws:
            await ws.send_json({**BODY, "max_tokens": 1})
            assert [message.json()["type"] async for message in ws] == ["token", "done"]


@pytest.mark.parametrize(("fields", "words"), [
    ({"allowed_origins": ("https://ui.example/",)}, "no trailing slash"),
    ({"allowed_origins": ("ui.example",)}, "scheme://host"),
    ({"allowed_methods": ("PO ST",)}, "HTTP method"),
    ({"allowed_headers": ("x:y",)}, "HTTP header"),
    ({"allowed_origins": ["*"]}, "tuple of strings"),
])
def test_bad_cors_settings_are_refused(fields, words):
    with pytest.raises(ValueError, match=words):
        FrontendConfig(served_model_name="m", **fields)
