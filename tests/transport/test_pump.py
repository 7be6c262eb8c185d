"""SocketPump: every message of a burst arrives in order, full pipes queue and flush, bad callbacks are contained."""
from __future__ import annotations

import asyncio
import logging

import pytest
import zmq
import zmq.asyncio

from fastdecode.transport.pump import MAX_MESSAGES_PER_CALLBACK, SocketPump

pytestmark = pytest.mark.timeout(30)


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


async def test_a_burst_longer_than_one_callback_arrives_whole_and_in_order(ctx) -> None:
    received: list[bytes] = []
    server = SocketPump(_bound(ctx, zmq.ROUTER, "inproc://pump-burst"), lambda f: received.append(f[1].bytes),
                        name="server")
    client_sock = ctx.socket(zmq.DEALER)
    client_sock.connect("inproc://pump-burst")
    client = SocketPump(client_sock, lambda f: None, name="client")
    num_messages = 3 * MAX_MESSAGES_PER_CALLBACK + 5
    for i in range(num_messages):
        client.send([i.to_bytes(4, "little")])
    await _wait_for(lambda: len(received) == num_messages)
    assert received == [i.to_bytes(4, "little") for i in range(num_messages)]
    client.close()
    server.close()


async def test_replies_sent_from_the_callback_reach_the_caller(ctx) -> None:
    server: SocketPump | None = None

    def echo(frames: list[zmq.Frame]) -> None:
        assert server is not None
        server.send([frames[0], frames[1].bytes + b"!"])

    server = SocketPump(_bound(ctx, zmq.ROUTER, "inproc://pump-echo"), echo, name="server")
    replies: list[bytes] = []
    sock = ctx.socket(zmq.DEALER)
    sock.connect("inproc://pump-echo")
    client = SocketPump(sock, lambda f: replies.append(f[0].bytes), name="client")
    for i in range(100):
        client.send([b"%d" % i])
        if i % 7 == 0:
            await asyncio.sleep(0)  # interleave sends with the loop's callbacks
    await _wait_for(lambda: len(replies) == 100)
    assert replies == [b"%d!" % i for i in range(100)]
    client.close()
    server.close()


async def test_sends_beyond_the_high_water_mark_queue_then_flush_in_order(ctx) -> None:
    receiver_sock = ctx.socket(zmq.PULL)
    receiver_sock.setsockopt(zmq.RCVHWM, 2)
    port = receiver_sock.bind_to_random_port("tcp://127.0.0.1")
    sender_sock = ctx.socket(zmq.PUSH)
    sender_sock.setsockopt(zmq.SNDHWM, 2)
    sender_sock.connect(f"tcp://127.0.0.1:{port}")
    sender = SocketPump(sender_sock, lambda f: None, name="sender")
    payload = bytes(1 << 20)
    num_messages = 96  # 96 MiB: more than the HWMs and the kernel's socket buffers hold
    for i in range(num_messages):
        sender.send([i.to_bytes(4, "little"), payload])
    assert sender.num_unsent > 0  # nobody reads yet: ZeroMQ refused some, the pump kept them
    received: list[int] = []
    receiver = SocketPump(receiver_sock, lambda f: received.append(int.from_bytes(f[0].bytes, "little")),
                          name="receiver")
    await _wait_for(lambda: len(received) == num_messages)
    assert received == list(range(num_messages)) and sender.num_unsent == 0
    sender.close()
    receiver.close()


async def test_a_failing_callback_is_logged_and_the_pump_goes_on(ctx, caplog) -> None:
    received: list[bytes] = []

    def picky(frames: list[zmq.Frame]) -> None:
        if frames[0].bytes == b"bad":
            raise RuntimeError("cannot handle this")
        received.append(frames[0].bytes)

    receiver = SocketPump(_bound(ctx, zmq.PULL, "inproc://pump-picky"), picky, name="picky")
    sock = ctx.socket(zmq.PUSH)
    sock.connect("inproc://pump-picky")
    with caplog.at_level(logging.ERROR):
        for body in (b"one", b"bad", b"two"):
            sock.send(body)
        await _wait_for(lambda: len(received) == 2)
    assert received == [b"one", b"two"] and "cannot handle this" in caplog.text
    sock.close(linger=0)
    receiver.close()
    assert receiver.closed


async def test_what_a_message_wakes_runs_before_the_next_message_is_handled(ctx) -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(3)]
    events: list[str] = []

    def on_message(frames: list[zmq.Frame]) -> None:
        index = int(frames[0].bytes)
        events.append(f"message {index}")
        futures[index].set_result(index)

    async def waiter(index: int) -> None:
        await futures[index]
        events.append(f"woken {index}")

    waiters = [asyncio.ensure_future(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)  # every waiter is parked on its future
    sock = ctx.socket(zmq.PUSH)
    sock.connect("inproc://pump-wake")
    receiver_sock = _bound(ctx, zmq.PULL, "inproc://pump-wake")
    for i in range(3):
        sock.send(b"%d" % i)  # all three wait in the socket before the pump starts
    receiver = SocketPump(receiver_sock, on_message, name="receiver")
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert events == ["message 0", "woken 0", "message 1", "woken 1", "message 2", "woken 2"]
    sock.close(linger=0)
    receiver.close()


async def test_a_frame_without_a_buffer_is_refused_before_anything_is_sent(ctx) -> None:
    received: list[list[bytes]] = []
    receiver = SocketPump(_bound(ctx, zmq.PULL, "inproc://pump-refuse"), lambda f: received.append(
        [frame.bytes for frame in f]), name="receiver")
    sock = ctx.socket(zmq.PUSH)
    sock.connect("inproc://pump-refuse")
    sender = SocketPump(sock, lambda f: None, name="sender")
    with pytest.raises(TypeError, match="frame 1"):
        sender.send([b"head", "text is not a buffer", b"tail"])
    with pytest.raises(ValueError):
        sender.send([])
    sender.send([b"whole", bytearray(b"message")])
    await _wait_for(lambda: len(received) == 1)
    assert received == [[b"whole", b"message"]]  # no stray half message went out before it
    sender.close()
    receiver.close()


async def test_refuses_asyncio_sockets() -> None:
    actx = zmq.asyncio.Context()
    sock = actx.socket(zmq.DEALER)
    with pytest.raises(TypeError):
        SocketPump(sock, lambda f: None, name="x")
    sock.close(linger=0)
    actx.destroy(linger=0)


def _bound(ctx: zmq.Context, socket_type: int, address: str) -> zmq.Socket:
    sock = ctx.socket(socket_type)
    sock.bind(address)
    return sock
