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

IPv6: ZeroMQ resolves tcp hosts as IPv4 unless a socket has ``zmq.IPV6`` set, so a
bind to ``tcp://[::1]:5555`` failed ("No such device") and a connect never
completed.  The sockets made here turn it on for a tcp address whose host is an
IPv6 literal (``tcp://[::1]:5555``, ``tcp://[::]:5555`` for every interface, v4 and v6);
other addresses keep IPv4 resolution, because with the option on ZeroMQ reports an
IPv4 bind as ``tcp://[::ffff:127.0.0.1]:PORT`` and may resolve ``localhost`` to
``::1`` (where /etc/hosts lists it), which a peer bound to 127.0.0.1 does not answer.
"""
from __future__ import annotations

import zmq

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


def make_socket(ctx: zmq.Context, socket_type: int, *, max_message_bytes: int) -> zmq.Socket:
    """A plain (non-asyncio) socket of ``ctx`` with our limits, for a SocketPump.

    Inbound frames over ``max_message_bytes`` make ZeroMQ drop the peer.  ``ctx``
    may be a ``zmq.asyncio.Context``: inproc:// peers must share the Context.
    Binding or connecting it to an IPv6 literal (``tcp://[::1]:5555``) turns IPv6 on.
    """
    sock = ctx.socket(socket_type, socket_class=_Socket)
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
