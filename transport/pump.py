"""One ZeroMQ socket driven by the event loop's reader callback: no Future or Task per message.

zmq.asyncio wraps every receive and send in a Future and wakes a Task per message; on the attend path that
costs as much as the codec (docs/benchmarks.md, transport).  A ``SocketPump`` registers the socket's file
descriptor with the running loop once.  When it signals, the pump flushes the sends that found the pipe full,
receives one waiting multipart message without blocking and hands it to ``on_message`` right there, then reads
``EVENTS`` and, only when another message waits, handles it in a callback of its own, after whatever the first
woke.
``send`` tries at once without blocking (``copy=False``: big buffers are not copied) and queues, in order, only
when ZeroMQ refuses (high-water mark).

ZeroMQ's descriptor is edge-triggered: any operation on the socket may consume its signal while messages are
waiting, so after a send the pump reads ``EVENTS`` and schedules a drain itself when input waits.  The socket
belongs to the loop's thread; nothing else may touch it.

The per-frame calls go straight to pyzmq's backend socket methods with plain int flags: pyzmq's Python layer
(``send_multipart``/``recv_multipart``) builds an ``enum.Flag`` per frame and reads ``RCVMORE`` with another
call per frame, which cost more than libzmq itself on the attend path.  A received frame carries ``more``.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

import numpy as np
import zmq
import zmq.asyncio
from zmq.backend import Socket as _BackendSocket

log = logging.getLogger(__name__)

_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_send, _recv, _get = _BackendSocket.send, _BackendSocket.recv, _BackendSocket.get
_BUFFER_TYPES = (bytes, np.ndarray, zmq.Frame, memoryview)  # known to support the buffer protocol (and subclasses)

MAX_MESSAGES_PER_CALLBACK = 1  # then the loop's other callbacks run, and the next message in the next iteration
MessageCallback = Callable[[list[zmq.Frame]], None]


class SocketPump:
    def __init__(self, sock: zmq.Socket, on_message: MessageCallback, *, name: str) -> None:
        if isinstance(sock, zmq.asyncio.Socket):
            raise TypeError("SocketPump drives a plain zmq.Socket, not a zmq.asyncio one")
        self._sock = sock
        self._on_message = on_message
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._unsent: deque[list[Any]] = deque()
        self._is_drain_scheduled = False
        # a send-only socket (PUSH, PUB) never has anything to receive
        self._can_receive = sock.type not in (zmq.PUSH, zmq.PUB)
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_drain()

    @property
    def closed(self) -> bool:
        return self._sock.closed

    @property
    def num_unsent(self) -> int:
        return len(self._unsent)

    def send(self, frames: list[Any]) -> None:
        """Send one multipart message now, or queue it behind earlier ones that ZeroMQ could not take yet.

        Raises zmq.ZMQError for a failure other than a full pipe (closed socket), TypeError or ValueError for
        frames that cannot be sent (checked before any frame goes out).
        """
        check_frames(frames)
        if self._unsent or not send_nowait(self._sock, frames):
            self._unsent.append(frames)
        if not self._is_drain_scheduled:  # else we are inside a drain, which reads EVENTS once the callback returns
            self._check_events()

    def _check_events(self) -> None:
        if self._is_drain_scheduled or self._sock.closed:
            return
        wanted = (_POLLIN if self._can_receive else 0) | (_POLLOUT if self._unsent else 0)
        if _get(self._sock, _EVENTS) & wanted:
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        self._is_drain_scheduled = True
        self._loop.call_soon(self._drain)

    def _flush(self) -> None:
        while self._unsent:
            try:
                if not send_nowait(self._sock, self._unsent[0]):
                    return
            except zmq.ZMQError as exc:
                log.warning("%s: a queued send failed: %s", self._name, exc)
            self._unsent.popleft()

    def _drain(self) -> None:
        self._is_drain_scheduled = False
        sock = self._sock
        if sock.closed:
            return
        if self._unsent:
            self._flush()
        if not self._can_receive:
            self._check_events()
            return
        # The descriptor fired, or a drain was scheduled because EVENTS showed input: a message nearly always waits,
        # so try to receive it at once (an EVENTS read costs a poll system call inside libzmq).
        frames = recv_nowait(sock)
        if frames is None:
            self._check_events()  # nothing after all: EVENTS re-arms the descriptor after that failed recv
            return
        # One message per callback: sends made by ``on_message`` skip their EVENTS check (read once, below), and
        # a next message waits for a drain scheduled behind whatever this one woke (the task awaiting a reply).
        self._is_drain_scheduled = True
        try:
            self._on_message(frames)
        except Exception:  # noqa: BLE001 - one bad message must not stop the socket; logged with traceback
            log.exception("%s: error handling a message", self._name)
        self._is_drain_scheduled = False
        self._check_events()  # re-arms the descriptor; a drain only when input (or a flush) waits

    def close(self, *, linger_ms: int = 0) -> None:
        """Stop watching the socket and close it; queued sends are dropped."""
        if self._sock.closed:
            return
        self._loop.remove_reader(self._fd)
        if self._unsent:
            log.debug("%s: %d queued message(s) dropped at close", self._name, len(self._unsent))
            self._unsent.clear()
        self._sock.close(linger=linger_ms)


def send_nowait(sock: zmq.Socket, frames: list[Any]) -> bool:
    """Send one multipart message without blocking (``copy=False``); False when ZeroMQ refuses it (no peer
    yet, or the high-water mark). A multipart message is atomic: once ZeroMQ takes its first frame it takes
    the others too. Check the frames first (``check_frames``): a bad one raises after earlier frames went."""
    last = len(frames) - 1
    try:
        _send(sock, frames[0], (_NOBLOCK | _SNDMORE) if last else _NOBLOCK, False)
    except zmq.Again:
        return False
    for i in range(1, last):
        _send(sock, frames[i], _NOBLOCK | _SNDMORE, False)
    if last:
        _send(sock, frames[last], _NOBLOCK, False)
    return True


def recv_nowait(sock: zmq.Socket) -> list[zmq.Frame] | None:
    """One waiting multipart message (zero-copy frames), or None when nothing waits."""
    try:
        frame = _recv(sock, _NOBLOCK, False)
    except zmq.Again:
        return None
    frames = [frame]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        frames.append(frame)
    return frames


def check_frames(frames: list[Any]) -> None:
    """Refuse an empty message or a frame without the buffer protocol before any frame is sent."""
    if not frames:
        raise ValueError("a message needs at least one frame")
    for i, frame in enumerate(frames):
        if type(frame) not in _BUFFER_TYPES and not isinstance(frame, _BUFFER_TYPES):
            try:
                memoryview(frame)
            except TypeError:
                raise TypeError(f"frame {i} ({type(frame).__name__}) does not support the buffer protocol") from None
