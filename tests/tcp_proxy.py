"""A loopback TCP proxy for tests that cut a ZeroMQ connection without restarting either end (a network blip).

Every connection accepted on ``address`` is piped to the upstream port over a connection of its own. ``cut()``
resets the client-side connections, so a connecting ZeroMQ socket reconnects (through the proxy, which keeps
listening, to a new upstream connection); with ``keep_upstream`` the upstream side stays open, so the server
still holds the old connection when the new one arrives (a blip whose reset never reached the server).
"""
from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.num_accepted = 0
        self._server: asyncio.Server | None = None
        self._client_writers: list[asyncio.StreamWriter] = []
        self._upstream_writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.num_accepted += 1
        self._client_writers.append(client_writer)
        self._upstream_writers.append(upstream_writer)
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            task = asyncio.create_task(self._pipe(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

    def cut(self, *, keep_upstream: bool = False) -> None:
        """Reset the connections made so far (the client side; the upstream side too unless ``keep_upstream``)."""
        writers, self._client_writers = self._client_writers, []
        if not keep_upstream:
            writers += self._upstream_writers
            self._upstream_writers = []
        for writer in writers:
            writer.transport.abort()

    async def wait_accepted(self, count: int, *, timeout_s: float = 3.0) -> None:
        """Until ``count`` connections were accepted in all."""
        async with asyncio.timeout(timeout_s):
            while self.num_accepted < count:
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.cut()
        for writer in self._upstream_writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
