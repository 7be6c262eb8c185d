"""The errors a transport caller can see.

``ProtocolError``: a message that does not decode (bad envelope, unknown kind, bad
field, frame mismatch, too large).  ``PeerDeadError``: the peer stopped answering
heartbeats or was restarted.  ``RemoteRequestError``: the peer answered this
request with an error reply (the issue's "request error").  ``RequestTimeoutError``:
no reply within the request's timeout (also a builtin ``TimeoutError``).
"""
from __future__ import annotations


class TransportError(Exception):
    """Base of every error raised by fastdecode.transport."""


class ProtocolError(TransportError):
    """A message that cannot be decoded or violates the channel's schema.

    ``request_id`` is set when the envelope was readable far enough to know which
    request the bad message belongs to, so a server can answer that request.
    """

    def __init__(self, message: str, *, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class PeerDeadError(TransportError):
    """The peer missed ``liveness`` heartbeats in a row, answered one as another instance (it was restarted and
    lost the requests it held), or the client was closed."""


class RemoteRequestError(TransportError):
    """The peer answered with an error reply: ``code`` is machine-readable, ``message`` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class RequestTimeoutError(TransportError, TimeoutError):
    """No reply arrived within the request's timeout."""
