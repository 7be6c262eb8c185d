"""ZeroMQ socket set-up and zero-copy sending shared by the RPC client and server."""
from __future__ import annotations

import asyncio
import logging
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


def send_frames(sock: zmq.asyncio.Socket, frames: list[Any]) -> asyncio.Future:
    """Send one multipart message without copying big buffers; returns the send's future.

    ``copy=False`` makes pyzmq wrap each buffer in a zero-copy message whose
    reference it holds until libzmq is done with it (frames under the socket's
    ``copy_threshold``, 64 KiB, are copied: cheaper than tracking them).  We do not
    ask for ``track=True``: nothing here reuses a sent buffer, and on this 2-core
    dev machine tracking made a 1.3 MiB attend round trip 35-40 % slower
    (docs/benchmarks.md).  Consequence for callers: do not modify an array after
    sending it (o, q, k, v are fresh per step).  A send that cannot complete at
    once (high-water mark) finishes later; its failure is logged.
    """
    future = sock.send_multipart(frames, copy=False)
    if not future.done():
        future.add_done_callback(_log_send_failure)
    elif future.exception() is not None:
        raise future.exception()
    return future


def _log_send_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a queued send failed: %s", future.exception())
