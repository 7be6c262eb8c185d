"""What every handler of one Frontend app shares: its config, metrics and the engine."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from aiohttp import web

from fastdecode.actors.api import AsyncLLM
from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.metrics import FrontendMetrics
from fastdecode.actors.frontend.tool_fields import ToolServing
from fastdecode.actors.reasoning_parsers import REASONING_PARSERS
from fastdecode.actors.model.tokenizer import Tokenizer

log = logging.getLogger("fastdecode.frontend")


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.IGNORECASE)  # scheme://host[:port], as browsers send it
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP method or header name (RFC 9110 token)


@dataclass(frozen=True)
class FrontendConfig:
    """``allowed_*`` and ``is_credentials_allowed``: CORS for browsers, as vLLM's ``--allowed-origins`` (also
    checked against a WebSocket's Origin), ``--allowed-methods``, ``--allowed-headers`` and ``--allow-credentials``;
    ``"*"`` allows any."""

    served_model_name: str
    model: str | None = None  # the model as given (--model): the model card's ``root``; None: the served name
    api_key: str | None = None  # None: no key needed
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    is_credentials_allowed: bool = False
    tool_serving: ToolServing = ToolServing()  # --enable-auto-tool-choice, --tool-call-parser
    response_role: str = "assistant"  # the role of a chat response's message (vLLM's --response-role)
    reasoning_parser: str | None = None  # vLLM's --reasoning-parser: a chat choice's thinking split off (None: not)

    def __post_init__(self) -> None:
        if not self.response_role:
            raise ValueError("the response role must not be empty")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}: this server has "
                             f"{', '.join(REASONING_PARSERS)}")
        if not self.served_model_name:
            raise ValueError("the served model name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty")
        for name, values in (("origins", self.allowed_origins), ("methods", self.allowed_methods),
                             ("headers", self.allowed_headers)):
            if not isinstance(values, tuple) or not all(isinstance(value, str) for value in values):
                raise ValueError(f"allowed {name} must be a tuple of strings, got {values!r}")
        for origin in self.allowed_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"allowed origin {origin!r} is not '*' nor an origin like https://example.com:8080 "
                                 "(scheme://host[:port], no path, no trailing slash)")
        for kind, names in (("method", self.allowed_methods), ("header", self.allowed_headers)):
            for name in names:
                if not _TOKEN.fullmatch(name):
                    raise ValueError(f"allowed {kind} {name!r} is not '*' nor an HTTP {kind} name")


class FrontendState:
    """The engine is attached once it has started and detached when stopping;
    until then requests get 503 and ``/health`` is not ready.  Its tokenizer stays
    after the detach: streams still open then turn their last tokens into text."""

    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.metrics = FrontendMetrics(config.served_model_name)
        self._llm: AsyncLLM | None = None
        self._tokenizer: Tokenizer | None = None  # the attached engine's, kept once it is detached
        self.is_draining = False  # stopping: running requests finish, new ones get 503

    @property
    def llm(self) -> AsyncLLM | None:
        return self._llm

    @llm.setter
    def llm(self, llm: AsyncLLM | None) -> None:
        """Attach the started engine (and log the sampling defaults its model brings), or detach it."""
        self._llm = llm
        if llm is not None:
            self._tokenizer = llm.tokenizer
            log_sampling_defaults(llm)

    @property
    def is_ready(self) -> bool:
        return self._llm is not None and not self.is_draining

    def require_llm(self) -> AsyncLLM:
        """The engine, for a new request: 503 while draining or not started."""
        if self.is_draining:
            raise ApiError(503, "the server is draining (shutting down): it takes no new requests",
                           code="draining")
        return self.started_llm()

    def started_llm(self) -> AsyncLLM:
        """The engine once attached (draining or not); 503 ``not_ready`` before."""
        if self._llm is None:
            raise ApiError(503, "the model is not ready (starting or stopping)", code="not_ready")
        return self._llm

    def check_model(self, model: str | None) -> None:
        """A request may omit the model; naming another one is a 404."""
        name = self.config.served_model_name
        if model is not None and model != name:
            raise ApiError(404, f"the model `{model}` does not exist; this server serves `{name}`",
                           param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        return self._attached_tokenizer().token_text(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token ``token_id`` stands for (a byte-fallback token: its one byte)."""
        return self._attached_tokenizer().token_bytes(token_id)

    def _attached_tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("no engine was ever attached: there is no tokenizer")
        return self._tokenizer


def log_sampling_defaults(llm: AsyncLLM) -> None:
    """Say at start-up which sampling defaults the model's generation config sets (vLLM logs it too)."""
    described = llm.model_config.sampling_defaults.describe()
    if described:
        log.warning("default sampling parameters have been overridden by the model's Hugging Face generation "
                    "config (generation_config.json): %s; a request's own values still win", described)


STATE = web.AppKey("fastdecode_frontend_state", FrontendState)
