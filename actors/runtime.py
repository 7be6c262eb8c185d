"""The actor runtime: serve a plain logic object's ``on_<message>`` handlers over a channel.

An actor is any object with handler methods named after the request classes of
its channel (``Attend`` -> ``on_attend``), each taking the message and returning
the reply message (or None for ``Ok``), and optionally a ``close()``.  The table
from message type to handler is built once, from the channel's classes, never
from strings on the wire.  Plain handlers run one at a time, in arrival order,
on ONE dedicated worker thread per actor (so blocking native calls never stall
the event loop, and the actor's state is only touched by that thread); ``async``
handlers run on the event loop.  A plain handler's request costs no Task and no
Future: the socket's reader callback queues it for the worker, the worker runs
it, builds and encodes the reply, and hands the frames back to the loop with one
``call_soon_threadsafe`` that sends them.  An actor whose loop has a thread of its
own (a shard daemon, a threaded in-process shard) may name ``inline_messages``:
those run right on the loop's thread while the worker is idle (so still one at a
time, in arrival order), which saves two thread hand-offs per message; heartbeats
then wait for the handler, which must stay short (an attend, not a pool set-up).
A handler that raises ``ActorError`` answers with that code; any other exception
is logged and answered ``internal``.  When the actor stops, every request still
waiting is answered ``actor_stopped``.

The same ``ActorServer`` serves ``inproc://`` (embedded, same zmq Context and
event loop, same codec) or ``tcp://`` / ``ipc://`` (own process).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import queue
import re
import threading
from typing import Any, Awaitable, Callable

import zmq.asyncio

from fastdecode.transport.codec import DEFAULT_MAX_MESSAGE_BYTES, Codec
from fastdecode.transport.control_messages import ACTOR_STOPPED, INTERNAL, UNSUPPORTED, ErrorReply, Ok, Ping
from fastdecode.transport.messages import Channel, Message
from fastdecode.transport.server import AdmitCallback, RpcServer

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


class _Job:
    """One request for a plain handler, from the reader callback to the worker thread and back."""

    __slots__ = ("peer", "request_id", "cls", "handler", "message", "is_answered")

    def __init__(self, peer: bytes, request_id: int, cls: type[Message], handler: Callable, message: Message) -> None:
        self.peer, self.request_id, self.cls, self.handler, self.message = peer, request_id, cls, handler, message
        self.is_answered = False  # set on the loop's thread when stop() answered it first


class _Worker:
    """The actor's one thread: runs queued callables in order until it takes None."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"{name}-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _run(self) -> None:
        while (fn := self._queue.get()) is not None:
            fn()

    async def finish(self, last: Callable[[], None]) -> None:
        """Run ``last`` after everything queued so far, then end the thread; waits for ``last`` only."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run_last() -> None:
            try:
                last()
                done.set_result(None)
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                done.set_exception(exc)

        self._queue.put(run_last)
        self._queue.put(None)
        await asyncio.wrap_future(done)


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
        inline_messages: tuple[type[Message], ...] = (),
        admit: AdmitCallback | None = None,
        is_draining: Callable[[], bool] | None = None,
    ) -> None:
        """``admit``: the server's gate before any handler (transport/server.py), e.g. a shard's session check;
        ``is_draining``: what its Pongs say of a drain."""
        self.actor = actor
        self.name = name or type(actor).__name__
        self._handlers = build_handler_table(actor, channel)
        self._is_async = {cls: inspect.iscoroutinefunction(h) for cls, h in self._handlers.items()}
        for cls in inline_messages:
            if cls not in self._handlers or self._is_async[cls]:
                raise TypeError(f"{cls.__name__} has no plain handler in {self.name}: it cannot run inline")
        self._inline = frozenset(inline_messages)
        self._server = RpcServer(address, Codec(channel, max_message_bytes=max_message_bytes), self._on_request,
                                 ctx=ctx, name=self.name, admit=admit, is_draining=is_draining)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _Worker | None = None
        self._jobs: set[_Job] = set()  # queued or running on the worker, not yet answered
        self._tasks: set[asyncio.Task] = set()  # running async handlers
        self._is_running = False

    @property
    def address(self) -> str | None:
        return self._server.address

    @property
    def num_dropped(self) -> int:
        return self._server.num_dropped

    def seconds_since_ping(self, client_id: int) -> float | None:
        """Seconds since a heartbeat tagged ``client_id`` came (RpcServer.seconds_since_ping)."""
        return self._server.seconds_since_ping(client_id)

    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        self._worker = _Worker(self.name)
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
        if not self._is_running or self._worker is None:
            self._server.reply(peer, request_id, ErrorReply(ACTOR_STOPPED, f"{self.name} is stopping"))
            return
        if self._is_async[cls]:
            task = asyncio.get_running_loop().create_task(handler(message))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finish_task, peer, request_id, cls))
            return
        if cls in self._inline and not self._jobs:  # the worker is idle: no reordering, no concurrency
            try:
                reply = self._reply_for(cls, handler(message), None)
            except Exception as exc:  # noqa: BLE001 - turned into this request's error reply
                reply = self._reply_for(cls, None, exc)
            self._server.reply(peer, request_id, reply)
            return
        job = _Job(peer, request_id, cls, handler, message)
        self._jobs.add(job)
        self._worker.submit(functools.partial(self._run_job, job))

    def _run_job(self, job: _Job) -> None:
        """On the worker thread: run the handler, encode its reply, hand the frames to the loop."""
        if job.is_answered:
            return  # stop() answered it while it waited in the queue
        try:
            reply = self._reply_for(job.cls, job.handler(job.message), None)
        except Exception as exc:  # noqa: BLE001 - turned into this request's error reply
            reply = self._reply_for(job.cls, None, exc)
        frames = self._server.encode_reply(job.request_id, reply)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._send_job_reply, job, frames)
        except RuntimeError:  # the loop is closed: nobody is left to answer
            log.debug("%s: loop closed, reply to %d dropped", self.name, job.request_id)

    def _send_job_reply(self, job: _Job, frames: list) -> None:
        self._jobs.discard(job)
        if not job.is_answered:
            job.is_answered = True
            self._server.send_encoded(job.peer, job.request_id, frames)

    def _finish_task(self, peer: bytes, request_id: int, cls: type[Message], task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            reply: Message = ErrorReply(ACTOR_STOPPED, f"{self.name} stopped before answering {cls.__name__}")
        else:
            reply = self._reply_for(cls, task.result() if task.exception() is None else None, task.exception())
        self._server.reply(peer, request_id, reply)

    def _reply_for(self, cls: type[Message], result: Any, exc: BaseException | None) -> Message:
        if isinstance(exc, ActorError):
            return ErrorReply(exc.code, exc.message)
        if exc is not None:  # a handler bug must not kill the actor: logged, answered
            log.error("%s: %s failed", self.name, cls.__name__, exc_info=exc)
            return ErrorReply(INTERNAL, f"{type(exc).__name__}: {exc}")
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
        jobs, self._jobs = list(self._jobs), set()
        for job in jobs:  # a running handler finishes on its thread; its caller is answered now
            job.is_answered = True
            self._server.reply(job.peer, job.request_id,
                               ErrorReply(ACTOR_STOPPED, f"{self.name} stopped before answering {job.cls.__name__}"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)  # let the done-callbacks send their replies
        worker, self._worker = self._worker, None
        close = getattr(self.actor, "close", None)
        if worker is not None:
            try:
                await worker.finish(close if callable(close) else (lambda: None))
            except Exception:  # noqa: BLE001 - stopping must finish; the failure is logged
                log.exception("%s: close() failed", self.name)
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
