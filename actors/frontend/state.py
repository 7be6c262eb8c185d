"""What every handler of one Frontend app shares: its config, metrics and the engine."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.metrics import FrontendMetrics


@dataclass(frozen=True)
class FrontendConfig:
    served_model_name: str
    api_key: str | None = None  # None: no key needed

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("the served model name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty")


class FrontendState:
    """The engine is attached once it has started and detached when stopping;
    until then requests get 503 and ``/health`` is not ready."""

    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.metrics = FrontendMetrics()
        self.llm: AsyncLLM | None = None
        self.is_draining = False  # stopping: running requests finish, new ones get 503

    @property
    def is_ready(self) -> bool:
        return self.llm is not None and not self.is_draining

    def require_llm(self) -> AsyncLLM:
        if not self.is_ready:
            raise ApiError(503, "the model is not ready (starting or stopping)", code="not_ready")
        assert self.llm is not None
        return self.llm

    def check_model(self, model: str | None) -> None:
        """A request may omit the model; naming another one is a 404."""
        name = self.config.served_model_name
        if model is not None and model != name:
            raise ApiError(404, f"the model `{model}` does not exist; this server serves `{name}`",
                           param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        assert self.llm is not None
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)


STATE = web.AppKey("fastdecode_frontend_state", FrontendState)
