"""A request's event channel out of the Executor: order kept, the reader waits while it is empty."""
from __future__ import annotations

import asyncio

import pytest

from fastdecode.actors.request import TokenEvent
from fastdecode.actors.sequence import EventChannel


async def test_events_come_out_in_order_and_a_reader_waits_for_the_next():
    channel = EventChannel()
    channel.put_nowait(TokenEvent(1, 10, 0))
    channel.put_nowait(TokenEvent(1, 11, 1))
    assert channel.qsize() == 2
    assert [(await channel.get()).token_id for _ in range(2)] == [10, 11]
    reader = asyncio.create_task(channel.get())
    await asyncio.sleep(0)
    assert not reader.done()
    channel.put_nowait(TokenEvent(1, 12, 2, finish_reason="length"))
    assert (await asyncio.wait_for(reader, 1.0)).finish_reason == "length"


async def test_a_cancelled_reader_leaves_the_channel_usable():
    channel = EventChannel()
    reader = asyncio.create_task(channel.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    channel.put_nowait(TokenEvent(1, 5, 0))
    assert (await asyncio.wait_for(channel.get(), 1.0)).token_id == 5
