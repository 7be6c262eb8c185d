"""ZeroMQ socket set-up shared by the RPC client and server.

Sends go through ``SocketPump.send`` with ``copy=False`` and no ``track``: pyzmq
wraps each buffer of 64 KiB or more (its ``copy_threshold``) in a zero-copy
message and holds a reference to it until libzmq is done with it, smaller ones are
copied.  Tracking made a 1.3 MiB attend round trip 35-40 % slower
(docs/benchmarks.md), so the rule is the caller's: do not write to an array after
sending it until the reply to the request that carried it has arrived (by then
the peer has received every frame; over inproc the peer's arrays are views of the
sender's memory, so a handler must not keep them past its reply).  After a
timeout or a dead peer the request may still be queued in ZeroMQ: its buffers
must then not be written again while the socket lives.

Identity: a ROUTER knows each peer by a routing id.  One that a DEALER does not set is drawn by the ROUTER
for each connection, so a DEALER whose TCP connection is re-established (a network blip, neither process
restarted) would come back as a new peer, and what the server remembers of it (the client session its Ping
declared: transport/server.py) would be lost.  Every DEALER made here therefore sets ``zmq.ROUTING_ID`` before
it connects: 16 random bytes whose first is not 0 (ZeroMQ reserves ids starting with a zero byte for those it
draws).  ZeroMQ sends it in the handshake of every connection (inside the encrypted INITIATE under CURVE), so
it is the same peer after a reconnect.  Every ROUTER made here sets ``zmq.ROUTER_HANDOVER``: a connection that
arrives with an id the ROUTER still holds (the old connection's reset has not reached the server yet) takes the
id over and the old connection is closed; without it ZeroMQ ignores the new connection until the old one ends.
Replies the ROUTER had queued on the old connection are lost with it, as before (the request times out).

IPv6: ZeroMQ resolves tcp hosts as IPv4 unless a socket has ``zmq.IPV6`` set, so a
bind to ``tcp://[::1]:5555`` failed ("No such device") and a connect never
completed.  The sockets made here turn it on for a tcp address whose host is an
IPv6 literal (``tcp://[::1]:5555``, ``tcp://[::]:5555`` for every interface, v4 and v6);
other addresses keep IPv4 resolution, because with the option on ZeroMQ reports an
IPv4 bind as ``tcp://[::ffff:127.0.0.1]:PORT`` and may resolve ``localhost`` to
``::1`` (where /etc/hosts lists it), which a peer bound to 127.0.0.1 does not answer.
"""
from __future__ import annotations

import re
import secrets

import zmq

ROUTING_ID_BYTES = 16
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000  # capped back-off of ZeroMQ's own reconnects
LINGER_MS = 200


def is_ipv6_address(address: str) -> bool:
    """True for a tcp address with an IPv6 literal host: ``tcp://[::1]:5555`` (either side of a
    ``tcp://SOURCE;DESTINATION`` connect)."""
    if not address.startswith("tcp://"):
        return False
    return any(":" in part.rsplit(":", 1)[0] for part in address[len("tcp://"):].split(";"))


class _Socket(zmq.Socket):
    """A socket that turns ``zmq.IPV6`` on before binding or connecting to an IPv6 literal address."""

    def bind(self, addr: str):  # noqa: ANN201 - pyzmq's return type
        if is_ipv6_address(addr):
            self.setsockopt(zmq.IPV6, 1)
        return super().bind(addr)

    def connect(self, addr: str):  # noqa: ANN201 - pyzmq's return type
        if is_ipv6_address(addr):
            self.setsockopt(zmq.IPV6, 1)
        return super().connect(addr)


def new_routing_id() -> bytes:
    """A DEALER's routing id: ``ROUTING_ID_BYTES`` random bytes, the first not 0 (reserved by ZeroMQ)."""
    return bytes([1 + secrets.randbelow(255)]) + secrets.token_bytes(ROUTING_ID_BYTES - 1)


def make_socket(ctx: zmq.Context, socket_type: int, *, max_message_bytes: int) -> zmq.Socket:
    """A plain (non-asyncio) socket of ``ctx`` with our limits, for a SocketPump.

    Inbound frames over ``max_message_bytes`` make ZeroMQ drop the peer.  ``ctx``
    may be a ``zmq.asyncio.Context``: inproc:// peers must share the Context.
    Binding or connecting it to an IPv6 literal (``tcp://[::1]:5555``) turns IPv6 on.  A DEALER gets a random
    routing id of its own, a ROUTER hands a known id over to a new connection (see above).
    """
    sock = ctx.socket(socket_type, socket_class=_Socket)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    if socket_type == zmq.DEALER:
        sock.setsockopt(zmq.ROUTING_ID, new_routing_id())
    elif socket_type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    return sock


TCP_ADDRESS = re.compile(r"tcp://(\[[^\[\]]+\]|[^:\[\]]+):(.*)")  # host (an IPv6 one in brackets), port


def check_address(address: str, *, listener: str | None = None) -> None:
    """ValueError unless ZeroMQ takes ``address`` as given: ``ipc://PATH`` or ``tcp://HOST:PORT`` with a port in
    1..65535 (ZeroMQ would wrap a larger one silently: 99999 binds 34463). ``listener`` None: an address to bind,
    whose port may also be 0 or * (any free one); else one to connect to, where ``listener`` (named in the error)
    listens on its own port."""
    if address.startswith("ipc://"):
        if len(address) == len("ipc://"):
            raise ValueError(f"{address!r} names no path: use ipc://PATH")
        return
    if not address.startswith("tcp://"):
        raise ValueError(f"{address!r} must start with tcp:// or ipc://")
    match = TCP_ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError(f"cannot read {address!r}: use tcp://HOST:PORT (an IPv6 host in brackets: tcp://[::1]:PORT)")
    port = match.group(2)
    if listener is None and port in ("0", "*"):
        return
    if not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        hint = " (or 0 or *: any free port)" if listener is None else f": give the port {listener} listens on"
        raise ValueError(f"port {port!r} of {address!r} is not in 1..65535{hint}")


def is_loopback_address(address: str) -> bool:
    """True for inproc/ipc and tcp on 127.x, ::1 or localhost."""
    if address.startswith(("inproc://", "ipc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"
