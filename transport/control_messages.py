"""Messages every channel carries: heartbeats and the generic replies.

Kinds 1..15 are reserved for these; channel modules start at 16.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastdecode.transport.messages import Message, int_field

MAX_CONTROL_KIND = 15
MAX_INSTANCE_ID = 2**64 - 1


@dataclass(frozen=True)
class Pong(Message):
    """The answer to a Ping; any reply also proves the peer alive.

    ``instance_id`` is drawn at random by each server when it starts.  A client that sees it change knows the
    process behind the address was restarted and the requests the old one held are lost: it declares the peer
    dead, as if heartbeats had been missed (transport/client.py).  ``is_draining`` tells a client, within a
    heartbeat, that the server is draining (actors/node_drain.py), with no request of its own.
    """

    KIND = 2
    instance_id: int = int_field(min_value=0, max_value=MAX_INSTANCE_ID)
    is_draining: bool = False  # the server is draining (a shard daemon after SIGTERM): its clients move away


@dataclass(frozen=True)
class Ping(Message):
    """A heartbeat.  A server answers it on its event loop, even while a handler runs.

    ``client_id`` names the client's run where it has one (an Executor's session id; 0: none): a server
    remembers when it last heard each, so a shard can tell a live but idle Executor from a gone one
    (``RpcServer.seconds_since_ping``).  A client closing on purpose sends one last Ping ``is_closing``,
    and the server forgets it at once (a killed one is forgotten only by its silence).
    """

    KIND = 1
    REPLY = Pong
    client_id: int = int_field(min_value=0, max_value=MAX_INSTANCE_ID, default=0)
    is_closing: bool = False


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
