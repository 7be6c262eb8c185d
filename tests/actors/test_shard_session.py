"""A shard serves one client session: a stranger's socket may not free, allocate or attend on its KV.

Served as the daemon serves it (a DrainableShard behind an RpcServer whose ``admit`` hook is the shard's),
with real DEALER sockets: the Executor's own (which declared its session by a Ping, then sent Configure), a
second one of the same session that declared itself by a Ping (the Executor's attend link), and a stranger's. Over tcp, the attend link stays
its session's after its connection is cut and re-established (tests/tcp_proxy.py).
"""
from __future__ import annotations

import uuid

import numpy as np
import pytest
from tcp_proxy import TcpProxy

from fastdecode.actors.kvshard import KVShard, ShardConfig
from fastdecode.actors.runtime import ActorError, build_handler_table
from fastdecode.actors.shard_drain import NOT_SESSION_OWNER, DrainableShard
from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import ErrorReply, Ok, Ping
from fastdecode.transport.errors import RemoteRequestError
from fastdecode.transport.server import RpcServer
from fastdecode.transport.shard_messages import SHARD_CHANNEL, Allocate, Attend, Configure, Free, GetStats

pytestmark = pytest.mark.timeout(30)

SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=64, kv_dtype="float32")
SESSION = 12345


@pytest.fixture(params=["inproc"])
async def served(request):
    """(shard, connect): served over inproc, or over loopback tcp for a test that asks for it (indirect "tcp")."""
    shard = DrainableShard(KVShard(ShardConfig(kv_memory_bytes=16 << 20, num_threads=1, is_calibrating=False)))
    handlers = build_handler_table(shard, SHARD_CHANNEL)

    def on_request(peer: bytes, request_id: int, message) -> None:  # the handlers, run right here
        try:
            reply = handlers[type(message)](message) or Ok()
        except ActorError as exc:
            reply = ErrorReply(exc.code, exc.message)
        server.reply(peer, request_id, reply)

    address = "tcp://127.0.0.1:0" if request.param == "tcp" else f"inproc://fastdecode-session-{uuid.uuid4().hex[:12]}"
    server = RpcServer(address, Codec(SHARD_CHANNEL), on_request, admit=shard.admit)
    address = await server.start()
    clients = []

    def connect(at: str = address, **options) -> RpcClient:
        client = RpcClient(at, Codec(SHARD_CHANNEL), timeout_s=5.0, **options)
        client.start()
        clients.append(client)
        return client

    yield shard, connect
    for client in clients:
        await client.close()
    await server.close()
    shard.close()


def _attend(seq_ids: list[int]) -> Attend:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((len(seq_ids), 2, 64), dtype=np.float32)
    kv = rng.standard_normal((len(seq_ids), 2, 64), dtype=np.float32)
    return Attend(0, np.array(seq_ids, np.int64), q, kv, kv)


async def test_a_strangers_requests_are_refused_and_the_sessions_are_served(served) -> None:
    shard, connect = served
    owner, link, stranger = connect(), connect(), connect()
    owner.client_id = SESSION
    await owner.request(Ping(client_id=SESSION))  # as ShardClient.configure declares its session first
    await owner.request(Configure(**SHAPE, session_id=SESSION))
    await owner.request(Allocate((1, 2, 3)))
    for message in (Free(tuple(range(1000))), Free((1,)), Allocate((7,)), _attend([1])):
        with pytest.raises(RemoteRequestError) as info:
            await stranger.request(message)
        assert info.value.code == NOT_SESSION_OWNER, message
    assert shard.num_sequences == 3  # nothing of the session's was touched
    assert (await stranger.request(GetStats())).num_sequences == 3  # stats are anyone's
    with pytest.raises(RemoteRequestError) as info:  # nor does a heartbeat of another session let it in
        await stranger.request(Ping(client_id=SESSION + 1))
        await stranger.request(Free((1,)))
    assert info.value.code == NOT_SESSION_OWNER
    await link.request(Ping(client_id=SESSION))  # the attend link declares its session: served
    assert (await link.request(_attend([1, 2]))).o.shape == (2, 2, 64)
    await owner.request(Free((3,)))
    assert shard.num_sequences == 2


async def test_a_stranger_is_refused_even_after_a_configure_the_shard_refused(served) -> None:
    shard, connect = served
    owner, stranger = connect(), connect()
    owner.client_id = SESSION
    await owner.request(Ping(client_id=SESSION))  # as ShardClient.configure declares its session first
    await owner.request(Configure(**SHAPE, session_id=SESSION))
    await owner.request(Allocate((1,)))
    with pytest.raises(RemoteRequestError, match="busy|another Executor"):
        await stranger.request(Configure(**SHAPE, session_id=SESSION + 1))
    with pytest.raises(RemoteRequestError) as info:
        await stranger.request(Free((1,)))
    assert info.value.code == NOT_SESSION_OWNER and shard.num_sequences == 1


async def test_a_free_naming_an_unknown_sequence_frees_nothing(served) -> None:
    shard, connect = served
    owner = connect()
    await owner.request(Ping(client_id=SESSION))  # as ShardClient.configure declares its session first
    await owner.request(Configure(**SHAPE, session_id=SESSION))
    await owner.request(Allocate((1, 2)))
    with pytest.raises(RemoteRequestError) as info:
        await owner.request(Free((1, 2, 99)))
    assert info.value.code == "unknown_sequence" and "nothing was freed" in info.value.message
    assert shard.num_sequences == 2
    await owner.request(Free((1, 2)))
    assert shard.num_sequences == 0


@pytest.mark.parametrize("served", ["tcp"], indirect=True)
async def test_the_attend_link_stays_the_sessions_after_a_reconnect(served) -> None:
    """A network blip re-establishes the link's connection: its next Attend is served, with no new heartbeat."""
    shard, connect = served
    owner = connect()
    owner.client_id = SESSION
    await owner.request(Ping(client_id=SESSION))  # as ShardClient.configure declares its session first
    await owner.request(Configure(**SHAPE, session_id=SESSION))
    await owner.request(Allocate((1, 2)))
    proxy = TcpProxy(int(owner.address.rsplit(":", 1)[1]))
    try:
        link = connect(await proxy.start(), heartbeat_interval_s=60.0)  # declares itself once, as ShardClient.link
        await link.request(Ping(client_id=SESSION))
        assert (await link.request(_attend([1, 2]))).o.shape == (2, 2, 64)
        proxy.cut()
        await proxy.wait_accepted(2)
        assert (await link.request(_attend([1, 2]))).o.shape == (2, 2, 64)
        assert shard.num_sequences == 2 and proxy.num_accepted == 2
    finally:
        await proxy.close()


async def test_an_attend_link_in_use_outlives_many_newer_peers(served, monkeypatch) -> None:
    """The server remembers the declared session of its most recent MAX_PEERS peers; the attend link declares
    itself once, so a stream of newer peers (say an Executor crash-looping against a shard another one holds) used
    to push it out, and its next Attend was refused as a stranger's. A peer's requests keep it among the recent."""
    monkeypatch.setattr("fastdecode.transport.server.MAX_PEERS", 3)
    shard, connect = served
    owner, link = connect(), connect(heartbeat_interval_s=60.0)
    owner.client_id = SESSION
    await owner.request(Ping(client_id=SESSION))
    await owner.request(Configure(**SHAPE, session_id=SESSION))
    await owner.request(Allocate((1, 2)))
    await link.request(Ping(client_id=SESSION))
    for other_session in range(1, 8):
        await connect(heartbeat_interval_s=60.0).request(Ping(client_id=other_session))
        assert (await link.request(_attend([1, 2]))).o.shape == (2, 2, 64), other_session
