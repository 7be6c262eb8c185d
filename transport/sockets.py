"""ZeroMQ socket set-up and zero-copy sending shared by the RPC client and server."""
from __future__ import annotations

import logging
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000  # capped back-off of ZeroMQ's own reconnects
LINGER_MS = 200


def make_socket(ctx: zmq.asyncio.Context, socket_type: int, *, max_message_bytes: int) -> zmq.asyncio.Socket:
    """A socket with our limits: inbound frames over ``max_message_bytes`` make ZeroMQ drop the peer."""
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    return sock


def is_loopback_address(address: str) -> bool:
    """True for inproc/ipc and tcp on 127.x, ::1 or localhost."""
    if address.startswith(("inproc://", "ipc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


class SendKeeper:
    """Sends frames with ``copy=False, track=True`` and holds them until ZeroMQ is done with them.

    The caller must not modify an array it sent before ZeroMQ releases it;
    ``num_pending`` tells how many sends still hold buffers.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[zmq.MessageTracker, list[Any]]] = deque()

    async def send(self, sock: zmq.asyncio.Socket, frames: list[Any]) -> None:
        tracker = await sock.send_multipart(frames, copy=False, track=True)
        self._prune()
        if isinstance(tracker, zmq.MessageTracker) and not tracker.done:
            self._pending.append((tracker, frames))

    def _prune(self) -> None:
        while self._pending and self._pending[0][0].done:
            self._pending.popleft()

    @property
    def num_pending(self) -> int:
        self._prune()
        return len(self._pending)
