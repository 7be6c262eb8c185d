"""A DEALER keeps its identity at the server across a reconnect (a network blip, no process restart).

The server remembers the client session each peer declared in its last Ping (transport/server.py); a shard admits
KV requests only from its session's peers. Each DEALER the transport makes therefore sets an explicit random
routing id (ZeroMQ would give a reconnected one a new automatic id, an undeclared stranger's), and the server's
ROUTER hands that id over to the new connection even while it still holds the old one.
"""
from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio
from tcp_proxy import TcpProxy

from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import ErrorReply, Ok, Ping
from fastdecode.transport.link import BlockingLink
from fastdecode.transport.server import RpcServer
from fastdecode.transport.security import ClientKeys, ServerKeys, client_context, server_context, write_keys
from fastdecode.transport.shard_messages import SHARD_CHANNEL, Free
from fastdecode.transport.sockets import ROUTING_ID_BYTES, new_routing_id

pytestmark = pytest.mark.timeout(30)

SESSION = 4242
REFUSED = "not_in_session"


class SessionServer:
    """An RpcServer that answers Ok to a peer that declared SESSION, and refuses anyone else; records the peers."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.peers: list[bytes] = []  # of the requests answered
        self.server = RpcServer(address, Codec(SHARD_CHANNEL), self._on_request, ctx=ctx, admit=self._admit)

    def _admit(self, peer: bytes, client_id: int, message) -> ErrorReply | None:
        return None if client_id == SESSION else ErrorReply(REFUSED, f"peer {peer.hex()} declared {client_id}")

    def _on_request(self, peer: bytes, request_id: int, message) -> None:
        self.peers.append(peer)
        self.server.reply(peer, request_id, Ok())

    @property
    def port(self) -> int:
        return int(self.server.address.rsplit(":", 1)[1])


@pytest.fixture
async def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def served(ctx):
    """(server, proxy, proxy address): a SessionServer on loopback tcp behind a TcpProxy."""
    server = SessionServer(ctx, "tcp://127.0.0.1:0")
    await server.server.start()
    proxy = TcpProxy(server.port)
    address = await proxy.start()
    yield server, proxy, address
    await proxy.close()
    await server.server.close()


def _client(ctx, address: str) -> RpcClient:
    """A client whose heartbeats do not come within a test: it declares its session once, as the attend link does."""
    client = RpcClient(address, Codec(SHARD_CHANNEL), ctx=ctx, timeout_s=3.0, heartbeat_interval_s=60.0)
    client.start()
    return client


def test_routing_ids_are_random_and_never_start_with_a_zero_byte() -> None:
    ids = {new_routing_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == ROUTING_ID_BYTES and i[0] != 0 for i in ids)


async def test_a_dealer_has_an_explicit_routing_id_that_the_server_sees_as_its_peer(ctx, served) -> None:
    server, _, address = served
    clients = [_client(ctx, address), _client(ctx, server.server.address)]
    link = BlockingLink(server.server.address, Codec(SHARD_CHANNEL), ctx=ctx, timeout_s=3.0, is_alive=lambda: True)
    try:
        for client in clients:
            await client.request(Ping(client_id=SESSION))
            for seq_id in (1, 2):
                assert type(await client.request(Free((seq_id,)))) is Ok

        def link_requests() -> None:
            link.send(Ping(client_id=SESSION))  # its Pong is dropped as a late reply, as for ShardClient.link
            for seq_id in (1, 2):
                assert type(link.receive(link.send(Free((seq_id,))), Ok)) is Ok

        await asyncio.to_thread(link_requests)
        expected = [clients[0].routing_id] * 2 + [clients[1].routing_id] * 2 + [link.routing_id] * 2
        assert server.peers == expected
        assert len(set(expected)) == 3 and all(len(i) == ROUTING_ID_BYTES and i[0] != 0 for i in expected)
    finally:
        link.close()
        for client in clients:
            await client.close()


@pytest.mark.parametrize("keep_upstream", [False, True], ids=["both-sides-reset", "server-holds-old-connection"])
async def test_a_declared_client_is_still_admitted_after_its_connection_is_re_established(
        ctx, served, keep_upstream: bool) -> None:
    server, proxy, address = served
    client = _client(ctx, address)
    try:
        await client.request(Ping(client_id=SESSION))
        assert type(await client.request(Free((1,)))) is Ok
        proxy.cut(keep_upstream=keep_upstream)
        await proxy.wait_accepted(2)  # the DEALER reconnected: a new connection reaches the server
        assert type(await client.request(Free((2,)))) is Ok  # no new Ping came: still the declared peer
        assert server.peers == [client.routing_id] * 2 and proxy.num_accepted == 2
    finally:
        await client.close()


async def test_an_attend_link_declared_once_is_still_admitted_after_its_connection_is_re_established(
        ctx, served) -> None:
    server, proxy, address = served
    link = BlockingLink(address, Codec(SHARD_CHANNEL), ctx=ctx, timeout_s=3.0, is_alive=lambda: True)

    def request(seq_id: int) -> Ok:
        return link.receive(link.send(Free((seq_id,))), Ok)

    try:
        await asyncio.to_thread(link.send, Ping(client_id=SESSION))
        assert type(await asyncio.to_thread(request, 1)) is Ok
        proxy.cut()
        await proxy.wait_accepted(2)
        assert type(await asyncio.to_thread(request, 2)) is Ok
        assert server.peers == [link.routing_id] * 2
    finally:
        link.close()


async def test_a_curve_client_keeps_its_identity_across_a_reconnect(tmp_path) -> None:
    """Under CURVE the routing id travels in the encrypted handshake: the same peer, handed over, still admitted."""
    write_keys(tmp_path)
    security = server_context(ServerKeys.load(tmp_path))
    ctx = client_context(ClientKeys.load(tmp_path))
    server = SessionServer(security.ctx, "tcp://127.0.0.1:0")
    await server.server.start()
    proxy = TcpProxy(server.port)
    client = _client(ctx, await proxy.start())
    try:
        await client.request(Ping(client_id=SESSION))
        assert type(await client.request(Free((1,)))) is Ok
        proxy.cut(keep_upstream=True)
        await proxy.wait_accepted(2)
        assert type(await client.request(Free((2,)))) is Ok
        assert server.peers == [client.routing_id] * 2 and security.num_refused == 0
    finally:
        await client.close()
        await proxy.close()
        await server.server.close()
        ctx.destroy(linger=0)
        security.close()
