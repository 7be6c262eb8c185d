"""The calling end of a channel: a DEALER socket with request ids, timeouts and heartbeats.

Requests are matched to futures by id.  Every ``heartbeat_interval_s`` the client
sends a Ping; when nothing at all was heard from the peer since the previous Ping,
a liveness counter drops by one, and anything received resets it.  At zero the
peer is declared dead (the Paranoid Pirate pattern): every waiting request fails
with ``PeerDeadError`` and so does every later one.  A peer is therefore found
dead within ``(liveness + 1) * heartbeat_interval_s`` of its last sign of life.

Every Pong carries the server's ``instance_id``, drawn when it started.  The
client remembers the first one it sees; a Pong with another one means the process
at the address was restarted and the requests the old one held are lost, so the
peer is declared dead the same way, at the first heartbeat the new one answers.

Replies arrive through a ``SocketPump`` (the loop's reader callback sets each
request's future directly); a request's timeout is one timer, not a Task.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

import zmq
import zmq.asyncio

from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import ErrorReply, Ping, Pong
from fastdecode.transport.errors import PeerDeadError, ProtocolError, RemoteRequestError, RequestTimeoutError
from fastdecode.transport.messages import Message
from fastdecode.transport.pump import SocketPump
from fastdecode.transport.sockets import make_socket

log = logging.getLogger(__name__)

GOODBYE_LINGER_MS = 200  # how long closing waits for the goodbye heartbeat to leave


class RpcClient:
    def __init__(
        self,
        address: str,
        codec: Codec,
        *,
        ctx: zmq.asyncio.Context | None = None,
        timeout_s: float = 60.0,
        heartbeat_interval_s: float = 1.0,
        liveness: int = 3,
        name: str = "rpc-client",
    ) -> None:
        if timeout_s <= 0 or heartbeat_interval_s <= 0:
            raise ValueError("timeout_s and heartbeat_interval_s must be positive")
        if isinstance(liveness, bool) or not isinstance(liveness, int) or liveness < 1:
            raise ValueError(f"liveness must be a positive integer, got {liveness!r}")
        self.address = address
        self.timeout_s = timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_liveness = liveness
        self._codec = codec
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._name = name
        self._request_ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._pump: SocketPump | None = None
        self._tasks: list[asyncio.Task] = []
        self._dead_error: PeerDeadError | None = None
        self._liveness = liveness
        self._last_recv_s = 0.0
        self._peer_instance_id: int | None = None  # from the first Pong
        self.is_peer_draining = False  # a Pong said the server drains (it never says it stopped draining)
        self.client_id = 0  # carried by every heartbeat (Ping.client_id): the session this client serves, once known
        self.routing_id: bytes | None = None  # the socket's identity at the server, the same after a reconnect
        self._loop_time = time.monotonic  # the running loop's clock once started

    @property
    def max_message_bytes(self) -> int:
        return self._codec.max_message_bytes

    @property
    def is_alive(self) -> bool:
        return self._pump is not None and self._dead_error is None

    @property
    def peer_instance_id(self) -> int | None:
        """The server's instance id, from its first Pong (None before one came): one per server process."""
        return self._peer_instance_id

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._pump is not None:
            raise RuntimeError(f"{self._name}: already started")
        loop = asyncio.get_running_loop()
        sock = make_socket(self._ctx, zmq.DEALER, max_message_bytes=self._codec.max_message_bytes)
        try:
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(f"{self._name}: cannot connect to {self.address}: {exc}") from exc
        self.routing_id = sock.getsockopt(zmq.ROUTING_ID)
        self._loop_time = loop.time
        self._last_recv_s = loop.time()
        self._pump = SocketPump(sock, self._on_frames, name=self._name)
        self._tasks = [loop.create_task(self._heartbeat_loop(), name=f"{self._name}-heartbeat")]

    async def request(self, message: Message, *, timeout_s: float | None = None) -> Message:
        """Send one request and return its reply (of type ``message.REPLY``).

        Raises RemoteRequestError (error reply), RequestTimeoutError, PeerDeadError
        or ProtocolError (unencodable request or malformed reply).
        """
        if self._dead_error is not None:
            raise PeerDeadError(str(self._dead_error))
        pump = self._pump
        if pump is None:
            raise RuntimeError(f"{self._name}: not started")
        request_id = next(self._request_ids)
        frames = self._codec.encode(request_id, message)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting[request_id] = future
        timeout = self.timeout_s if timeout_s is None else timeout_s
        timer = loop.call_later(timeout, self._expire, future, message, timeout)
        try:
            pump.send(frames)
            reply = await future
        finally:
            timer.cancel()
            self._waiting.pop(request_id, None)
        if type(reply) is ErrorReply:
            raise RemoteRequestError(reply.code, reply.message)
        if message.REPLY is not None and type(reply) is not message.REPLY:
            raise ProtocolError(f"{type(message).__name__} answered with {type(reply).__name__}")
        return reply

    async def ping(self, *, timeout_s: float | None = None) -> None:
        await self.request(Ping(), timeout_s=timeout_s)

    def _expire(self, future: asyncio.Future, message: Message, timeout: float) -> None:
        if future.done():
            return
        if self._dead_error is not None:
            future.set_exception(PeerDeadError(str(self._dead_error)))
        else:
            future.set_exception(RequestTimeoutError(
                f"{type(message).__name__} to {self.address} got no reply within {timeout:g} s"))

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        self._last_recv_s = self._loop_time()
        self._liveness = self.max_liveness
        try:
            request_id, reply = self._codec.decode(frames)
        except ProtocolError as exc:
            log.warning("%s: bad reply from %s: %s", self._name, self.address, exc)
            future = self._waiting.get(exc.request_id) if exc.request_id is not None else None
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if type(reply) is Pong:
            if not self._is_same_instance(reply.instance_id):
                return
            self.is_peer_draining = self.is_peer_draining or reply.is_draining
        future = self._waiting.get(request_id)
        if future is not None and not future.done():
            future.set_result(reply)
        elif type(reply) is not Pong:
            log.debug("%s: late or unknown reply %d (%s)", self._name, request_id, type(reply).__name__)

    def _is_same_instance(self, instance_id: int) -> bool:
        """False, with the peer declared dead, when the server answering is not the one that answered first."""
        if self._peer_instance_id is None:
            self._peer_instance_id = instance_id
        elif instance_id != self._peer_instance_id:
            self._fail_all(PeerDeadError(f"{self.address} restarted (instance {self._peer_instance_id:016x} is now "
                                         f"{instance_id:016x}): the requests it held are lost"))
            return False
        return True

    async def _heartbeat_loop(self) -> None:
        assert self._pump is not None
        loop = asyncio.get_running_loop()
        ping_sent_s: float | None = None
        while self._dead_error is None:
            await asyncio.sleep(self.heartbeat_interval_s)
            if ping_sent_s is not None and self._last_recv_s < ping_sent_s:
                self._liveness -= 1
                if self._liveness <= 0:
                    silent_s = loop.time() - self._last_recv_s
                    self._fail_all(PeerDeadError(f"{self.address} silent for {silent_s:.2f} s "
                                                 f"({self.max_liveness} heartbeats missed)"))
                    return
            ping_sent_s = loop.time()
            try:
                self._pump.send(self._codec.encode(next(self._request_ids), Ping(self.client_id)))
            except zmq.ZMQError as exc:
                log.warning("%s: heartbeat to %s not sent: %s", self._name, self.address, exc)

    def _say_goodbye(self) -> bool:
        """Send the closing heartbeat of a client with a ``client_id`` to a live peer (True if sent)."""
        if not self.client_id or self._pump is None or self._pump.closed or self._dead_error is not None:
            return False
        try:
            self._pump.send(self._codec.encode(next(self._request_ids), Ping(self.client_id, is_closing=True)))
        except zmq.ZMQError as exc:
            log.debug("%s: goodbye to %s not sent: %s", self._name, self.address, exc)
            return False
        return True

    def _fail_all(self, error: PeerDeadError, *, is_closing: bool = False) -> None:
        if self._dead_error is None:
            self._dead_error = error
            log.log(logging.INFO if is_closing else logging.WARNING, "%s: %s", self._name, error)
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(PeerDeadError(str(error)))

    async def close(self) -> None:
        """Fail every waiting request with PeerDeadError, stop the tasks, close the socket. A client with a
        ``client_id`` first says goodbye (Ping.is_closing), so the server stops counting it as live at once."""
        is_saying_goodbye = self._say_goodbye()
        self._fail_all(PeerDeadError(f"client of {self.address} closed"), is_closing=True)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._tasks = []
        if self._pump is not None:
            self._pump.close(linger_ms=GOODBYE_LINGER_MS if is_saying_goodbye else 0)
            self._pump = None
