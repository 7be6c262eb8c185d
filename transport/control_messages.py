"""Messages every channel carries: heartbeats and the generic replies.

Kinds 1..15 are reserved for these; channel modules start at 16.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastdecode.transport.messages import Message

MAX_CONTROL_KIND = 15


@dataclass(frozen=True)
class Pong(Message):
    """The answer to a Ping; any reply also proves the peer alive."""

    KIND = 2


@dataclass(frozen=True)
class Ping(Message):
    """A heartbeat.  A server answers it on its event loop, even while a handler runs."""

    KIND = 1
    REPLY = Pong


@dataclass(frozen=True)
class Ok(Message):
    """Success without a payload."""

    KIND = 3


@dataclass(frozen=True)
class ErrorReply(Message):
    """The request with this id failed.  ``code`` is short and machine-readable (see ERROR_CODES)."""

    KIND = 4
    code: str
    message: str

    def validate(self) -> None:
        if not self.code:
            raise ValueError("ErrorReply.code must not be empty")


CONTROL_MESSAGES: tuple[type[Message], ...] = (Ping, Pong, Ok, ErrorReply)

# Codes used by the transport and the actor runtime; actors add their own.
PROTOCOL = "protocol"  # the request did not decode or broke the channel's schema
UNSUPPORTED = "unsupported"  # the actor has no handler for this message type
INTERNAL = "internal"  # the handler failed unexpectedly (logged with a traceback on the server)
ACTOR_STOPPED = "actor_stopped"  # the actor stopped before answering
