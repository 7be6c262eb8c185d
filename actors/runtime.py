"""The actor runtime: serve a plain logic object's ``on_<message>`` handlers over a channel.

An actor is any object with handler methods named after the request classes of
its channel (``Attend`` -> ``on_attend``), each taking the message and returning
the reply message (or None for ``Ok``), and optionally a ``close()``.  The table
from message type to handler is built once, from the channel's classes, never
from strings on the wire.  Plain handlers run one at a time, in arrival order,
on ONE dedicated worker thread per actor (so blocking native calls never stall
the event loop, and the actor's state is only touched by that thread); ``async``
handlers run on the event loop.  A handler that raises ``ActorError`` answers
with that code; any other exception is logged and answered ``internal``.  When
the actor stops, every request still waiting is answered ``actor_stopped``.

The same ``ActorServer`` serves ``inproc://`` (embedded, same zmq Context and
event loop, same codec) or ``tcp://`` / ``ipc://`` (own process).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import zmq.asyncio

from fastdecode.transport.codec import DEFAULT_MAX_MESSAGE_BYTES, Codec
from fastdecode.transport.control_messages import ACTOR_STOPPED, INTERNAL, UNSUPPORTED, ErrorReply, Ok, Ping
from fastdecode.transport.messages import Channel, Message
from fastdecode.transport.server import RpcServer

log = logging.getLogger(__name__)


class ActorError(Exception):
    """An expected failure of one request: answered as ErrorReply(code, message); the actor keeps serving."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def handler_name(cls: type[Message]) -> str:
    """``AppendPrompt`` -> ``on_append_prompt``."""
    return "on_" + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def build_handler_table(actor: object, channel: Channel) -> dict[type[Message], Callable[[Any], Any]]:
    """Map each request class of ``channel`` that ``actor`` handles to its bound handler."""
    table: dict[type[Message], Callable[[Any], Any]] = {}
    for cls in channel.request_classes:
        if cls is Ping:
            continue  # answered by the transport itself
        handler = getattr(actor, handler_name(cls), None)
        if handler is not None:
            if not callable(handler):
                raise TypeError(f"{type(actor).__name__}.{handler_name(cls)} is not callable")
            table[cls] = handler
    if not table:
        raise TypeError(f"{type(actor).__name__} handles no request of channel {channel.name}")
    return table


class ActorServer:
    """One actor behind one ROUTER socket; ``start()`` binds, ``stop()`` answers the waiting and closes."""

    def __init__(
        self,
        actor: object,
        channel: Channel,
        address: str,
        *,
        ctx: zmq.asyncio.Context | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        name: str | None = None,
    ) -> None:
        self.actor = actor
        self.name = name or type(actor).__name__
        self._handlers = build_handler_table(actor, channel)
        self._is_async = {cls: inspect.iscoroutinefunction(h) for cls, h in self._handlers.items()}
        self._server = RpcServer(address, Codec(channel, max_message_bytes=max_message_bytes), self._on_request,
                                 ctx=ctx, name=self.name)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[asyncio.Future] = set()
        self._is_running = False

    @property
    def address(self) -> str | None:
        return self._server.address

    @property
    def is_running(self) -> bool:
        return self._is_running

    @property
    def num_dropped(self) -> int:
        return self._server.num_dropped

    async def start(self) -> str:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-worker")
        address = await self._server.start()
        self._is_running = True
        log.info("%s: serving on %s", self.name, address)
        return address

    def _on_request(self, peer: bytes, request_id: int, message: Message) -> None:
        cls = type(message)
        handler = self._handlers.get(cls)
        if handler is None:
            self._server.reply(peer, request_id, ErrorReply(UNSUPPORTED, f"{self.name} does not handle {cls.__name__}"))
            return
        if not self._is_running or self._executor is None:
            self._server.reply(peer, request_id, ErrorReply(ACTOR_STOPPED, f"{self.name} is stopping"))
            return
        loop = asyncio.get_running_loop()
        if self._is_async[cls]:
            future: asyncio.Future = loop.create_task(handler(message))
        else:  # FIFO on the actor's one worker thread; no Task needed, the reply goes from the callback
            future = loop.run_in_executor(self._executor, handler, message)
        self._pending.add(future)
        future.add_done_callback(functools.partial(self._finish, peer, request_id, cls))

    def _finish(self, peer: bytes, request_id: int, cls: type[Message], future: asyncio.Future) -> None:
        self._pending.discard(future)
        self._server.reply(peer, request_id, self._reply_for(cls, future))

    def _reply_for(self, cls: type[Message], future: asyncio.Future) -> Message:
        if future.cancelled():
            return ErrorReply(ACTOR_STOPPED, f"{self.name} stopped before answering {cls.__name__}")
        exc = future.exception()
        if isinstance(exc, ActorError):
            return ErrorReply(exc.code, exc.message)
        if exc is not None:  # a handler bug must not kill the actor: logged, answered
            log.error("%s: %s failed", self.name, cls.__name__, exc_info=exc)
            return ErrorReply(INTERNAL, f"{type(exc).__name__}: {exc}")
        result = future.result()
        if result is None:
            return Ok()
        if not isinstance(result, Message):
            log.error("%s: handler for %s returned %r", self.name, cls.__name__, type(result))
            return ErrorReply(INTERNAL, f"handler for {cls.__name__} returned no message")
        return result

    async def stop(self) -> None:
        """Stop taking requests, answer every waiting one ``actor_stopped``, close the actor and the socket."""
        if not self._is_running:
            return
        self._is_running = False
        pending = list(self._pending)
        for future in pending:
            future.cancel()  # a running handler finishes on its thread; its caller is answered now
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.sleep(0)  # let the done-callbacks send their replies
        executor, self._executor = self._executor, None
        close = getattr(self.actor, "close", None)
        if executor is not None:
            if callable(close):
                try:
                    await asyncio.get_running_loop().run_in_executor(executor, close)
                except Exception:  # noqa: BLE001 - stopping must finish; the failure is logged
                    log.exception("%s: close() failed", self.name)
            executor.shutdown(wait=False, cancel_futures=True)
        await self._server.close()
        log.info("%s: stopped", self.name)


async def serve_actor(
    actor: object,
    channel: Channel,
    address: str,
    stop: asyncio.Event,
    *,
    ctx: zmq.asyncio.Context | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
) -> None:
    """Serve ``actor`` on ``address`` until ``stop`` is set; ``on_ready(bound_address)`` once it accepts requests."""
    server = ActorServer(actor, channel, address, ctx=ctx, max_message_bytes=max_message_bytes)
    bound = await server.start()
    try:
        if on_ready is not None:
            result = on_ready(bound)
            if inspect.isawaitable(result):
                await result
        await stop.wait()
    finally:
        await server.stop()
