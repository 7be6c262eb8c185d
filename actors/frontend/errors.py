"""Errors the Frontend answers with, in the OpenAI error JSON shape.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with the
HTTP status that goes with it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server answers with an error status (never a crash)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None, headers: Mapping[str, str] | None = None,
                 is_admitted: bool = False) -> None:
        super().__init__(message)
        self.status = status
        # an admitted request that failed while generating: counted as finished with ``error``, not as rejected
        self.is_admitted = is_admitted
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s  # sent as Retry-After, which the OpenAI clients' retries honour
        self.headers = dict(headers or {})  # more response headers (a 405's Allow...)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = dict(self.headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return web.json_response(self.body(), status=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)
