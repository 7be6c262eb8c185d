"""The Frontend actor: OpenAI-compatible HTTP, WebSocket token streaming and metrics
in front of an ``AsyncLLM``.  ``serve`` runs it; ``build_app`` is the aiohttp app."""
from fastdecode.actors.frontend.app import build_app
from fastdecode.actors.frontend.server import ServeConfig, serve
from fastdecode.actors.frontend.state import FrontendConfig, FrontendState

__all__ = ["FrontendConfig", "FrontendState", "ServeConfig", "build_app", "serve"]
