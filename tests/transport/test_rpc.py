"""RpcServer / RpcClient over inproc and tcp: matching, errors, timeouts, heartbeats, limits."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio
from polling import until

from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import ErrorReply, Ok
from fastdecode.transport.errors import PeerDeadError, RemoteRequestError, RequestTimeoutError
from fastdecode.transport.link import BlockingLink
from fastdecode.transport.server import RpcServer
from fastdecode.transport.shard_messages import SHARD_CHANNEL, AttendResult, Free, GetStats, ShardStats

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


class EchoServer:
    """Answers Free(seq_ids) after sum(seq_ids) milliseconds, AttendResult echoes, GetStats never."""

    def __init__(self, ctx, address, codec) -> None:
        self.server = RpcServer(address, codec, self.on_request, ctx=ctx, name="echo")
        self.tasks: set[asyncio.Task] = set()

    def on_request(self, peer, request_id, message) -> None:
        task = asyncio.get_running_loop().create_task(self.answer(peer, request_id, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, peer, request_id, message) -> None:
        if isinstance(message, Free):
            if any(s >= 1000 for s in message.seq_ids):
                self.server.reply(peer, request_id, ErrorReply("too_big", "seq id over 999"))
                return
            await asyncio.sleep(sum(message.seq_ids) / 1000)
            self.server.reply(peer, request_id, Ok())
        elif isinstance(message, AttendResult):
            self.server.reply(peer, request_id, message)


async def _pair(ctx, address, *, max_message_bytes=1 << 24, **client_kwargs):
    codec = Codec(SHARD_CHANNEL, max_message_bytes=max_message_bytes)
    echo = EchoServer(ctx, address, codec)
    bound = await echo.server.start()
    client = RpcClient(bound, codec, ctx=ctx, **{"heartbeat_interval_s": 0.05, "liveness": 3, **client_kwargs})
    client.start()
    return echo, client


@pytest.mark.parametrize("address", ["inproc://rpc-test", "tcp://127.0.0.1:0"])
async def test_concurrent_requests_are_matched_by_id(ctx, address) -> None:
    echo, client = await _pair(ctx, address)
    # the slower request is sent first: replies come back out of order
    slow, fast = Free((30, 20)), Free((1,))
    results = await asyncio.gather(client.request(slow), client.request(fast))
    assert all(type(r) is Ok for r in results)
    o = np.arange(2 * 4 * 64, dtype=np.float32).reshape(2, 4, 64)
    reply = await client.request(AttendResult(o))
    assert np.array_equal(reply.o, o) and not reply.o.flags.writeable
    await client.close()
    await echo.server.close()


async def test_error_reply_raises_remote_request_error(ctx) -> None:
    echo, client = await _pair(ctx, "inproc://rpc-error")
    with pytest.raises(RemoteRequestError) as info:
        await client.request(Free((1000,)))
    assert info.value.code == "too_big"
    assert type(await client.request(Free((0,)))) is Ok  # still usable
    await client.close()
    await echo.server.close()


async def test_timeout_fails_only_that_request(ctx) -> None:
    echo, client = await _pair(ctx, "tcp://127.0.0.1:0")
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        await client.request(GetStats(), timeout_s=0.3)  # the echo server never answers GetStats
    assert 0.25 < time.monotonic() - start < 1.0
    assert isinstance(RequestTimeoutError("x"), TimeoutError)
    assert client.is_alive and client.num_waiting == 0  # heartbeats kept it alive
    assert type(await client.request(Free((0,)))) is Ok
    await client.close()
    await echo.server.close()


async def test_dead_server_fails_waiting_requests_within_heartbeat_window(ctx) -> None:
    interval, liveness = 0.2, 3  # a 1.1 s bound: timer delays on a loaded 2-core CI box stay well inside it
    echo, client = await _pair(ctx, "tcp://127.0.0.1:0", heartbeat_interval_s=interval, liveness=liveness)
    await client.ping()
    waiting = asyncio.ensure_future(client.request(GetStats(), timeout_s=10))
    await asyncio.sleep(0.02)
    await echo.server.close()
    start = time.monotonic()
    with pytest.raises(PeerDeadError):
        await waiting  # only the heartbeats can end it this early (its timeout is 10 s)
    elapsed = time.monotonic() - start
    assert elapsed <= (liveness + 1) * interval + 0.3, elapsed
    assert not client.is_alive
    with pytest.raises(PeerDeadError):
        await client.request(Free((0,)))
    await client.close()


async def _restart(echo: EchoServer, ctx) -> EchoServer:
    """Close ``echo`` and start another server at its address (the port may take a moment to come free)."""
    address = echo.server.address
    await echo.server.close()
    successor = EchoServer(ctx, address, Codec(SHARD_CHANNEL, max_message_bytes=1 << 24))
    for _ in range(50):
        try:
            await successor.server.start()
            return successor
        except OSError:
            await asyncio.sleep(0.02)
    raise AssertionError(f"cannot bind {address} again")


async def test_a_server_restarted_at_the_same_address_fails_the_requests_it_lost(ctx) -> None:
    interval = 0.1  # the silence window, (5 + 1) * 0.1 s, is longer than ZeroMQ's reconnect to the successor
    echo, client = await _pair(ctx, "tcp://127.0.0.1:0", heartbeat_interval_s=interval, liveness=5)
    await client.ping()
    # the echo server never answers GetStats: both requests are held by it, and lost when it goes
    waiting = asyncio.ensure_future(client.request(GetStats(), timeout_s=4))
    link = BlockingLink(echo.server.address, Codec(SHARD_CHANNEL), ctx=ctx, timeout_s=4,
                        is_alive=lambda: client.is_alive)
    request_id = await asyncio.to_thread(link.send, GetStats())
    linked = asyncio.ensure_future(asyncio.to_thread(link.receive, request_id, ShardStats))
    await asyncio.sleep(0.05)
    first_instance_id = echo.server.instance_id
    successor = await _restart(echo, ctx)
    assert successor.server.instance_id != first_instance_id
    start = time.monotonic()
    with pytest.raises(PeerDeadError, match="restarted"):
        await waiting
    with pytest.raises(PeerDeadError):
        await linked
    assert time.monotonic() - start < 10 * interval  # not the request's 4 s timeout
    assert not client.is_alive
    with pytest.raises(PeerDeadError):
        await client.request(Free((0,)))
    link.close()
    await client.close()
    await successor.server.close()


async def test_close_fails_waiting_requests(ctx) -> None:
    echo, client = await _pair(ctx, "inproc://rpc-close")
    waiting = asyncio.ensure_future(client.request(GetStats()))
    await asyncio.sleep(0.02)
    await client.close()
    with pytest.raises(PeerDeadError):
        await waiting
    await echo.server.close()


async def test_wrong_reply_type_is_a_protocol_error(ctx) -> None:
    from fastdecode.transport.errors import ProtocolError

    codec = Codec(SHARD_CHANNEL)
    server = None

    def on_request(peer, request_id, message):
        server.reply(peer, request_id, Ok())

    server = RpcServer("inproc://rpc-wrong", codec, on_request, ctx=ctx)
    await server.start()
    client = RpcClient("inproc://rpc-wrong", codec, ctx=ctx)
    client.start()
    with pytest.raises(ProtocolError, match="answered with Ok"):
        await client.request(GetStats())
    await client.close()
    await server.close()


async def test_raw_garbage_gets_error_reply_or_is_dropped(ctx, caplog) -> None:
    echo, client = await _pair(ctx, "tcp://127.0.0.1:0", max_message_bytes=64 * 1024)
    raw = ctx.socket(zmq.DEALER)
    raw.connect(echo.server.address)
    codec = Codec(SHARD_CHANNEL)
    # readable request id, unknown kind -> error reply for that id
    import msgpack

    await raw.send_multipart([msgpack.packb([1, 250, 42, []])])
    request_id, reply = codec.decode(await asyncio.wait_for(raw.recv_multipart(), 2))
    assert request_id == 42 and type(reply) is ErrorReply and reply.code == "protocol"
    # unreadable -> dropped, counted
    await raw.send_multipart([b"\xc1garbage"])
    # total over the limit while every frame is under it -> error reply
    frames = codec.encode(43, AttendResult(np.zeros((4, 32, 128), np.float32)))  # 64 KiB + envelope
    await raw.send_multipart(frames[:1] + [bytes(frames[1])[: 60 * 1024]] * 2)
    request_id, reply = codec.decode(await asyncio.wait_for(raw.recv_multipart(), 2))
    assert request_id == 43 and reply.code == "protocol"
    # one frame over ZMQ_MAXMSGSIZE: ZeroMQ drops that connection; the server goes on serving others
    await raw.send_multipart([b"x" * (65 * 1024)])
    assert await raw.poll(200) == 0  # no answer to the dropped messages
    assert echo.server.num_dropped == 1
    assert "dropped an unreadable message" in caplog.text
    assert type(await client.request(Free((1,)))) is Ok
    raw.close(linger=0)
    await client.close()
    await echo.server.close()


async def test_a_flood_of_unreadable_messages_leaves_a_few_log_lines_and_the_server_serves(ctx, caplog) -> None:
    """A peer sending junk as fast as it can: every message is dropped and counted, but the log gets a line per
    interval (with the count held back), not one per message."""
    echo, client = await _pair(ctx, "tcp://127.0.0.1:0")
    raw = ctx.socket(zmq.DEALER)
    raw.connect(echo.server.address)
    for _ in range(500):
        await raw.send_multipart([b"\xc1junk"])
    assert type(await client.request(Free((1,)))) is Ok  # behind the junk on the server's socket
    await until(lambda: echo.server.num_dropped == 500)
    lines = [r for r in caplog.records if "dropped an unreadable message" in r.getMessage()]
    assert 1 <= len(lines) <= 2
    raw.close(linger=0)
    await client.close()
    await echo.server.close()


def test_client_argument_validation() -> None:
    codec = Codec(SHARD_CHANNEL)
    with pytest.raises(ValueError):
        RpcClient("inproc://x", codec, liveness=0)
    with pytest.raises(ValueError):
        RpcClient("inproc://x", codec, timeout_s=0)


async def test_the_heartbeats_tell_a_client_that_the_server_drains(ctx) -> None:
    codec = Codec(SHARD_CHANNEL)
    is_draining = [False]
    server = RpcServer("inproc://rpc-drain", codec, lambda peer, request_id, message: None, ctx=ctx,
                       is_draining=lambda: is_draining[0])
    bound = await server.start()
    client = RpcClient(bound, codec, ctx=ctx, heartbeat_interval_s=0.02, liveness=3)
    client.start()
    try:
        await client.ping(timeout_s=2.0)
        assert not client.is_peer_draining
        is_draining[0] = True
        deadline = time.monotonic() + 2.0
        while not client.is_peer_draining:  # the next heartbeat's Pong says so, with no request of the client's
            assert time.monotonic() < deadline, "no heartbeat told the drain"
            await asyncio.sleep(0.01)
        assert client.is_alive
    finally:
        await client.close()
        await server.close()
