"""Socket set-up: IPv6 literal addresses bind and connect; IPv4, ipc and inproc behave as before."""
from __future__ import annotations

import socket

import pytest
import zmq
import zmq.asyncio

from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import Ok
from fastdecode.transport.server import RpcServer
from fastdecode.transport.shard_messages import SHARD_CHANNEL, Free
from fastdecode.transport.sockets import is_ipv6_address, is_loopback_address, make_socket

pytestmark = pytest.mark.timeout(30)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def _round_trip(ctx, address: str) -> str:
    """Bind an RpcServer at ``address``, send one request from an RpcClient; the bound address."""
    codec = Codec(SHARD_CHANNEL)
    server = RpcServer(address, codec, lambda peer, request_id, message: server.reply(peer, request_id, Ok()),
                       ctx=ctx, name="ok")
    bound = await server.start()
    client = RpcClient(bound, codec, ctx=ctx, timeout_s=5.0)
    client.start()
    try:
        assert isinstance(await client.request(Free((1,))), Ok)
    finally:
        await client.close()
        await server.close()
    return bound


def test_ipv6_literals_are_recognised() -> None:
    assert is_ipv6_address("tcp://[::1]:5555") and is_ipv6_address("tcp://[fe80::1%eth0]:0")
    assert is_ipv6_address("tcp://127.0.0.1:0;[::1]:5555")
    assert not any(map(is_ipv6_address, ["tcp://127.0.0.1:5555", "tcp://*:0", "tcp://localhost:1",
                                         "ipc:///tmp/a:b", "inproc://x:y"]))
    assert is_loopback_address("tcp://[::1]:5555")


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_a_request_round_trips_over_ipv6_loopback(ctx) -> None:
    bound = await _round_trip(ctx, "tcp://[::1]:0")
    assert bound.startswith("tcp://[::1]:") and not bound.endswith(":0")


async def test_ipv4_ipc_and_inproc_are_unchanged(ctx, tmp_path) -> None:
    """IPv6 stays off for them: an IPv4 bind still reports its IPv4 address (not ``[::ffff:127.0.0.1]``)."""
    assert (await _round_trip(ctx, "tcp://127.0.0.1:0")).startswith("tcp://127.0.0.1:")
    assert await _round_trip(ctx, f"ipc://{tmp_path}/s") == f"ipc://{tmp_path}/s"
    assert await _round_trip(ctx, "inproc://ipv6-test") == "inproc://ipv6-test"
    sock = make_socket(ctx, zmq.DEALER, max_message_bytes=1 << 20)
    try:
        sock.connect("tcp://127.0.0.1:1")
        assert sock.getsockopt(zmq.IPV6) == 0
        sock.connect("tcp://[::1]:1")
        assert sock.getsockopt(zmq.IPV6) == 1
    finally:
        sock.close(linger=0)
