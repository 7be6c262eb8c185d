"""The app before its engine is attached (model still loading): not healthy, 503 with a JSON error."""
from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from fastdecode.actors.frontend import FrontendConfig, FrontendState, build_app


async def test_not_ready_until_the_engine_is_attached():
    state = FrontendState(FrontendConfig(served_model_name="m"))
    async with TestClient(TestServer(build_app(state))) as client:
        health = await client.get("/health")
        assert health.status == 503
        response = await client.post("/v1/completions", json={"prompt": "x"})
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "not_ready"
        for path in ("/v1/models", "/v1/models/m"):  # clients that wait for /v1/models wait for the model
            models = await client.get(path)
            assert models.status == 503 and (await models.json())["error"]["code"] == "not_ready"
        metrics = await client.get("/metrics")
        assert metrics.status == 200
        assert 'fastdecode_request_rejected_total{model_name="m",status_code="503"} 3.0' in await metrics.text()
