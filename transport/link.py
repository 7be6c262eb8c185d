"""A blocking request link: one thread's requests to an RpcServer, without the event loop.

The decode step sends one Attend per (layer, mini-batch, shard) from the Executor's
dense thread (actors/decode_step.py). Going through the event loop cost two thread
hand-offs and a loop wake-up per message, plus the GIL hand-offs that come with
them: several milliseconds per layer on the H100 host (docs/benchmarks.md). So that
thread talks to each shard over a DEALER socket of its own, made from the shard
client's Context (the same CURVE set-up; a ROUTER serves any number of peers), with
the same codec and envelope as RpcClient. Sends and receives block in ``zmq.poll``,
which releases the GIL. Its ``routing_id`` stays its identity at the server across
reconnects (transport/sockets.py), so the session its first Ping declared holds.

The asynchronous client stays the peer's owner: its heartbeats decide liveness. The
link checks ``is_alive()`` between poll slices, so a dead peer (silent, or
restarted: its request is lost) fails the wait with ``PeerDeadError`` within the
heartbeat window; a request gets ``RequestTimeoutError`` after ``timeout_s``. A reply whose request id is not the
one awaited (left over from a step that failed half-way) is dropped.

The socket belongs to the thread that first uses the link; ``close()`` may be
called from another thread once that one no longer uses it.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Callable

import zmq

from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import ErrorReply
from fastdecode.transport.errors import PeerDeadError, ProtocolError, RemoteRequestError, RequestTimeoutError
from fastdecode.transport.messages import Message
from fastdecode.transport.pump import check_frames, recv_nowait, send_nowait
from fastdecode.transport.sockets import make_socket

log = logging.getLogger(__name__)

POLL_SLICE_MS = 50  # how often a wait looks at the peer's liveness


class BlockingLink:
    def __init__(self, address: str, codec: Codec, *, ctx: zmq.Context, timeout_s: float,
                 is_alive: Callable[[], bool]) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.address = address
        self.timeout_s = timeout_s
        self._codec = codec
        self._ctx = ctx
        self._is_alive = is_alive
        self._sock: zmq.Socket | None = None
        self.routing_id: bytes | None = None  # the socket's identity at the server once made (transport/sockets.py)
        self._request_ids = itertools.count(1)
        self._is_closed = False

    def _socket(self) -> zmq.Socket:
        if self._is_closed:
            raise PeerDeadError(f"link to {self.address} closed")
        if self._sock is None:
            sock = make_socket(self._ctx, zmq.DEALER, max_message_bytes=self._codec.max_message_bytes)
            try:
                sock.connect(self.address)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise PeerDeadError(f"cannot connect to {self.address}: {exc}") from exc
            self.routing_id = sock.getsockopt(zmq.ROUTING_ID)
            self._sock = sock
        return self._sock

    def _wait(self, sock: zmq.Socket, event: int, deadline: float, what: str) -> None:
        """Until ``sock`` is ready for ``event``; PeerDeadError or RequestTimeoutError otherwise, after which
        the link is closed: requests still queued in it are dropped, so no buffer they were sent from without
        a copy is read after the caller stops waiting."""
        while not sock.poll(POLL_SLICE_MS, event):
            if not self._is_alive():
                self.close()
                raise PeerDeadError(f"{self.address} is dead: silent or restarted ({what})")
            if time.monotonic() > deadline:
                self.close()
                raise RequestTimeoutError(f"{what} to {self.address}: no answer within {self.timeout_s:g} s")

    def send(self, message: Message) -> int:
        """Send one request; returns its id for ``receive``."""
        if not self._is_alive():
            raise PeerDeadError(f"{self.address} is dead")
        sock = self._socket()
        request_id = next(self._request_ids)
        frames = self._codec.encode(request_id, message)
        check_frames(frames)
        deadline = time.monotonic() + self.timeout_s
        while not send_nowait(sock, frames):  # no peer yet, or its pipe is full: wait for room
            self._wait(sock, zmq.POLLOUT, deadline, type(message).__name__)
        return request_id

    def receive(self, request_id: int, reply_type: type[Message]) -> Message:
        """The reply to ``request_id``: RemoteRequestError for an error reply, ProtocolError for a bad one."""
        sock = self._socket()
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._wait(sock, zmq.POLLIN, deadline, reply_type.__name__)
            frames = recv_nowait(sock)
            if frames is None:
                continue
            try:
                reply_id, reply = self._codec.decode(frames)
            except ProtocolError as exc:
                if exc.request_id == request_id:
                    raise
                log.warning("link to %s: dropped a bad reply: %s", self.address, exc)
                continue
            if reply_id != request_id:
                log.debug("link to %s: dropped late reply %d", self.address, reply_id)
                continue
            if type(reply) is ErrorReply:
                raise RemoteRequestError(reply.code, reply.message)
            if type(reply) is not reply_type:
                raise ProtocolError(f"expected {reply_type.__name__} from {self.address}, got {type(reply).__name__}")
            return reply

    def has_reply(self) -> bool:
        """A reply (to some request) is waiting to be received."""
        return self._sock is not None and bool(self._sock.poll(0, zmq.POLLIN))

    def close(self) -> None:
        self._is_closed = True
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
