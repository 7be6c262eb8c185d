"""The serving end of a channel: a ROUTER socket that decodes requests and sends replies.

``RpcServer`` answers heartbeats itself, on the event loop, so a peer stays alive
while a long request runs elsewhere.  A message that does not decode gets an
error reply when its request id could be read, and is otherwise dropped with a
log line.  Every other request goes to the ``on_request(peer, request_id,
message)`` callback, which must not block; replies go back through ``reply``.
Messages are received by a ``SocketPump`` (the loop's reader callback), so a
request reaches ``on_request`` without a Task or Future of its own.

Each ``start`` draws a random 64-bit ``instance_id`` that every Pong carries: a
server restarted at the same address (say by systemd, within the heartbeat
window) answers Pings with another id, and its clients learn that the requests
they were waiting on are lost (transport/client.py).  A Ping's ``client_id`` (an Executor's session) is
remembered with its time, for ``seconds_since_ping``, and as the session of the peer (the socket) that sent it.
A peer is known by its DEALER's routing id, which the transport's DEALERs set themselves so that it survives a
reconnect; the ROUTER hands it over to the new connection (transport/sockets.py).

``admit(peer, client_id, message)``, when given, sees every other request first, on the loop, with the
``client_id`` its peer declared in its last Ping (0: none); an error reply it returns is sent instead of
passing the request on (a shard refuses a peer outside the session it serves: actors/shard_drain.py).
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Callable

import zmq
import zmq.asyncio

from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import PROTOCOL, ErrorReply, Ping, Pong
from fastdecode.transport.errors import ProtocolError
from fastdecode.transport.log_throttle import ThrottledWarning
from fastdecode.transport.messages import Message
from fastdecode.transport.pump import SocketPump
from fastdecode.transport.sockets import LINGER_MS, make_socket

log = logging.getLogger(__name__)

RequestCallback = Callable[[bytes, int, Message], None]
AdmitCallback = Callable[[bytes, int, Message], "ErrorReply | None"]
MAX_PING_CLIENTS = 256  # heartbeat senders remembered (the most recent); a shard has one Executor at a time
MAX_PEERS = 1024  # peers whose declared client_id is remembered (the most recent)


class RpcServer:
    def __init__(
        self,
        address: str,
        codec: Codec,
        on_request: RequestCallback,
        *,
        ctx: zmq.asyncio.Context | None = None,
        name: str = "rpc",
        admit: AdmitCallback | None = None,
        is_draining: Callable[[], bool] | None = None,
    ) -> None:
        self._requested_address = address
        self._codec = codec
        self._on_request = on_request
        self.admit = admit
        self._is_draining = is_draining  # what every Pong says of the server's drain (None: never draining)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._name = name
        self._pump: SocketPump | None = None
        self.address: str | None = None
        self.instance_id: int | None = None  # drawn by start(), carried by every Pong
        self.num_dropped = 0  # messages dropped without a reply (unreadable request id)
        self._warn_bad = ThrottledWarning(log)  # a peer's junk must not flood the log
        self._last_ping_s: dict[int, float] = {}  # client_id -> when its last heartbeat came (oldest first)
        self._peer_client_ids: dict[bytes, int] = {}  # peer -> the client_id of its last Ping (oldest first)

    async def start(self) -> str:
        """Bind and start receiving; returns the bound address (a ``:0`` or ``:*`` tcp port is resolved)."""
        if self._pump is not None:
            raise RuntimeError(f"{self._name}: already started")
        sock = make_socket(self._ctx, zmq.ROUTER, max_message_bytes=self._codec.max_message_bytes)
        address = self._requested_address
        if address.startswith("tcp://") and address.endswith(":0"):
            address = address[:-2] + ":*"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(f"{self._name}: cannot bind {self._requested_address}: {exc}") from exc
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
        self.address = endpoint.decode() if isinstance(endpoint, bytes) and endpoint else address
        self.instance_id = secrets.randbits(64)
        self._pump = SocketPump(sock, self._handle_frames, name=self._name)
        return self.address

    def _handle_frames(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            self.num_dropped += 1
            self._warn_bad("%s: dropped a message without body", self._name)
            return
        peer = frames[0].bytes
        try:
            request_id, message = self._codec.decode(frames[1:])
        except ProtocolError as exc:
            if exc.request_id is None:
                self.num_dropped += 1
                self._warn_bad("%s: dropped an unreadable message: %s", self._name, exc)
            else:
                self._warn_bad("%s: protocol error in request %d: %s", self._name, exc.request_id, exc)
                self.reply(peer, exc.request_id, ErrorReply(PROTOCOL, str(exc)))
            return
        if type(message) is Ping:
            if message.is_closing:
                self._last_ping_s.pop(message.client_id, None)
            elif message.client_id:
                self._note_ping(message.client_id)
            self._note_peer(peer, message.client_id, is_closing=message.is_closing)
            self.reply(peer, request_id, Pong(self.instance_id, self._is_draining is not None and self._is_draining()))
            return
        if self.admit is not None:
            refusal = self.admit(peer, self._peer_in_use(peer), message)
            if refusal is not None:
                self.reply(peer, request_id, refusal)
                return
        self._on_request(peer, request_id, message)

    def _note_peer(self, peer: bytes, client_id: int, *, is_closing: bool) -> None:
        """A Ping naming no client (0) leaves what the peer declared before; a closing one forgets it."""
        if is_closing:
            self._peer_client_ids.pop(peer, None)
        elif client_id:
            _remember(self._peer_client_ids, peer, client_id, MAX_PEERS)

    def _peer_in_use(self, peer: bytes) -> int:
        """The client_id ``peer`` declared (0: none), which its request keeps among the newest MAX_PEERS: a link
        declares itself once (the Executor's attend link), and newer peers must not push out one in use."""
        client_id = self._peer_client_ids.get(peer, 0)
        if client_id:
            _remember(self._peer_client_ids, peer, client_id, MAX_PEERS)
        return client_id

    def _note_ping(self, client_id: int) -> None:
        _remember(self._last_ping_s, client_id, time.monotonic(), MAX_PING_CLIENTS)

    def seconds_since_ping(self, client_id: int) -> float | None:
        """Seconds since a heartbeat tagged ``client_id`` came (None: none remembered)."""
        heard_s = self._last_ping_s.get(client_id)
        return None if heard_s is None else time.monotonic() - heard_s

    def reply(self, peer: bytes, request_id: int, message: Message) -> None:
        """Send a reply to one peer now (no await needed); a reply that cannot be encoded becomes an error reply.

        A peer that has gone away is skipped silently by the ROUTER socket.
        """
        self.send_encoded(peer, request_id, self.encode_reply(request_id, message))

    def encode_reply(self, request_id: int, message: Message) -> list:
        """The frames of a reply (thread-safe: the codec keeps no state); an unencodable one becomes an error reply."""
        try:
            return self._codec.encode(request_id, message)
        except (ProtocolError, ValueError, TypeError) as exc:
            log.error("%s: reply to %d cannot be encoded: %s", self._name, request_id, exc)
            return self._codec.encode(request_id, ErrorReply(PROTOCOL, f"reply cannot be encoded: {exc}"))

    def send_encoded(self, peer: bytes, request_id: int, frames: list) -> None:
        """Send frames from ``encode_reply``; on the loop's thread only."""
        pump = self._pump
        if pump is None or pump.closed:
            log.debug("%s: socket closed, reply to %d not sent", self._name, request_id)
            return
        try:
            pump.send([peer, *frames])
        except zmq.ZMQError as exc:
            log.warning("%s: reply to %d not sent: %s", self._name, request_id, exc)

    async def close(self) -> None:
        """Stop receiving and close the socket (replies already sent get the socket's linger to leave)."""
        if self._pump is not None:
            self._pump.close(linger_ms=LINGER_MS)
            self._pump = None


def _remember(entries: dict, key, value, limit: int) -> None:
    """``entries[key] = value`` as the newest entry, the oldest dropped past ``limit`` (a peer flooding new ids
    cannot grow the map)."""
    entries.pop(key, None)
    entries[key] = value
    while len(entries) > limit:
        del entries[next(iter(entries))]
