"""ZeroMQ socket set-up and zero-copy sending shared by the RPC client and server."""
from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np
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
    """Sends frames zero-copy and holds the big ones until ZeroMQ is done with them.

    Every frame of at least the socket's ``copy_threshold`` bytes (pyzmq copies
    smaller ones, which is cheaper) becomes a ``zmq.Frame(copy=False, track=True)``;
    the keeper holds those frames and their buffers until all their trackers are
    done.  (Tracking the small frames too, as ``send_multipart(track=True)`` does,
    was measured to double the round trip of a 1 MiB exchange.)  The caller must
    not modify an array it sent before ``is_done`` of its send.
    """

    def __init__(self) -> None:
        self._pending: deque[list[zmq.Frame]] = deque()

    async def send(self, sock: zmq.asyncio.Socket, frames: list[Any]) -> list[zmq.Frame]:
        """Send ``frames`` as one multipart message; return the tracked frames (possibly none)."""
        threshold = sock.copy_threshold
        tracked: list[zmq.Frame] = []
        parts: list[Any] = []
        for frame in frames:
            if not isinstance(frame, (bytes, zmq.Frame)) and _num_bytes(frame) >= threshold:
                frame = zmq.Frame(frame, copy=False, track=True)
                tracked.append(frame)
            parts.append(frame)
        await sock.send_multipart(parts, copy=False)
        self._prune()
        if tracked and not _is_done(tracked):
            self._pending.append(tracked)
        return tracked

    def _prune(self) -> None:
        while self._pending and _is_done(self._pending[0]):
            self._pending.popleft()

    @property
    def num_pending(self) -> int:
        """Sends whose big frames ZeroMQ still holds."""
        self._prune()
        return len(self._pending)


def _num_bytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, np.ndarray) else memoryview(frame).nbytes


def _is_done(frames: list[zmq.Frame]) -> bool:
    return all(frame.tracker.done for frame in frames)
