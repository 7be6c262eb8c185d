"""The actor runtime with a toy actor on a toy channel: dispatch, threads, errors, stopping."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
import zmq.asyncio

from fastdecode.actors.runtime import ActorError, ActorServer, build_handler_table, handler_name, serve_actor
from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import CONTROL_MESSAGES, Ok
from fastdecode.transport.errors import RemoteRequestError
from fastdecode.transport.messages import Channel, Message

pytestmark = pytest.mark.timeout(30)


@dataclass(frozen=True)
class Total(Message):
    KIND = 40
    total: int
    thread_id: int


@dataclass(frozen=True)
class AddValue(Message):
    KIND = 41
    REPLY = Total
    value: int


@dataclass(frozen=True)
class Sleep(Message):
    KIND = 42
    REPLY = Ok
    seconds: float


@dataclass(frozen=True)
class Fail(Message):
    KIND = 43
    REPLY = Ok
    is_expected: bool


@dataclass(frozen=True)
class Unhandled(Message):
    KIND = 44
    REPLY = Ok


@dataclass(frozen=True)
class AsyncPeek(Message):
    KIND = 45
    REPLY = Total


TOY_CHANNEL = Channel("toy", CONTROL_MESSAGES + (Total, AddValue, Sleep, Fail, Unhandled, AsyncPeek))


class Counter:
    def __init__(self) -> None:
        self.total = 0
        self.closed_on: int | None = None

    def on_add_value(self, message: AddValue) -> Total:
        self.total += message.value
        return Total(self.total, threading.get_ident())

    def on_sleep(self, message: Sleep) -> None:
        time.sleep(message.seconds)

    def on_fail(self, message: Fail) -> None:
        if message.is_expected:
            raise ActorError("no_luck", "asked to fail")
        raise RuntimeError("a bug")

    async def on_async_peek(self, message: AsyncPeek) -> Total:
        return Total(self.total, threading.get_ident())

    def close(self) -> None:
        self.closed_on = threading.get_ident()


@pytest.fixture
async def served():
    ctx = zmq.asyncio.Context()
    actor = Counter()
    server = ActorServer(actor, TOY_CHANNEL, "tcp://127.0.0.1:0", ctx=ctx)
    address = await server.start()
    client = RpcClient(address, Codec(TOY_CHANNEL), ctx=ctx, heartbeat_interval_s=0.05, liveness=3)
    client.start()
    yield actor, server, client
    await client.close()
    await server.stop()
    ctx.destroy(linger=0)


def test_handler_table_is_built_from_the_channel_classes() -> None:
    assert handler_name(AddValue) == "on_add_value" and handler_name(AsyncPeek) == "on_async_peek"
    table = build_handler_table(Counter(), TOY_CHANNEL)
    assert set(table) == {AddValue, Sleep, Fail, AsyncPeek}
    with pytest.raises(TypeError):
        build_handler_table(object(), TOY_CHANNEL)


async def test_sync_handlers_run_in_order_on_one_dedicated_thread(served) -> None:
    actor, _, client = served
    replies = await asyncio.gather(*(client.request(AddValue(v)) for v in range(1, 21)))
    assert [r.total for r in replies] == [sum(range(1, v + 1)) for v in range(1, 21)]
    thread_ids = {r.thread_id for r in replies}
    assert len(thread_ids) == 1 and threading.get_ident() not in thread_ids
    peek = await client.request(AsyncPeek())
    assert peek.total == 210 and peek.thread_id == threading.get_ident()  # async handlers run on the loop


async def test_heartbeats_are_answered_while_a_handler_blocks(served) -> None:
    _, _, client = served
    await client.request(Sleep(0.5))  # 10 heartbeat intervals, liveness 3
    assert client.is_alive


async def test_handler_failures_become_error_replies(served, caplog) -> None:
    actor, _, client = served
    with pytest.raises(RemoteRequestError) as info:
        await client.request(Fail(True))
    assert info.value.code == "no_luck"
    with pytest.raises(RemoteRequestError) as info:
        await client.request(Fail(False))
    assert info.value.code == "internal" and "a bug" in info.value.message
    assert "Fail failed" in caplog.text
    with pytest.raises(RemoteRequestError) as info:
        await client.request(Unhandled())
    assert info.value.code == "unsupported"
    assert (await client.request(AddValue(2))).total == 2  # the actor is still alive


async def test_stop_answers_waiting_callers_and_closes_on_the_worker(served) -> None:
    actor, server, client = served
    running = asyncio.ensure_future(client.request(Sleep(0.3)))
    queued = asyncio.ensure_future(client.request(AddValue(5)))
    await asyncio.sleep(0.1)
    await server.stop()
    for future in (running, queued):
        with pytest.raises(RemoteRequestError) as info:
            await future
        assert info.value.code == "actor_stopped"
    assert actor.total == 0  # the queued request never ran
    assert actor.closed_on is not None and actor.closed_on != threading.get_ident()


async def test_serve_actor_reports_ready_and_stops_on_event() -> None:
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    ready: list[str] = []
    actor = Counter()
    task = asyncio.ensure_future(serve_actor(actor, TOY_CHANNEL, "inproc://toy-serve", stop, ctx=ctx,
                                             on_ready=ready.append))
    while not ready:
        await asyncio.sleep(0.01)
    client = RpcClient(ready[0], Codec(TOY_CHANNEL), ctx=ctx)
    client.start()
    assert (await client.request(AddValue(3))).total == 3
    stop.set()
    await asyncio.wait_for(task, 5)
    assert actor.closed_on is not None
    await client.close()
    ctx.destroy(linger=0)
