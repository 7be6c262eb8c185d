"""What the Executor calls to use a KVShard, local (embedded) or remote, and the embedded shard itself.

    client = await ShardClient.connect("tcp://10.0.0.7:5555")
    await client.configure(num_layers=32, num_kv_heads=8, head_dim=128, kv_dtype="bfloat16")
    await client.allocate([1, 2]); await client.append_prompt(1, k, v)
    o, lse = await client.attend(layer, seq_ids, q, k, v, want_lse=True)

Errors: RemoteRequestError (the shard refused this request: ``.code`` says why),
RequestTimeoutError, PeerDeadError (no heartbeat answer within the window; the
client is dead for good, connect a new one), ProtocolError.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid

import numpy as np
import zmq.asyncio

from fastdecode.actors.kvshard import KVShard, ShardConfig
from fastdecode.transport.event_loop import new_event_loop
from fastdecode.actors.runtime import ActorServer
from fastdecode.transport.link import BlockingLink
from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import DEFAULT_MAX_MESSAGE_BYTES, Codec
from fastdecode.transport.control_messages import Ping
from fastdecode.transport.errors import PeerDeadError, RequestTimeoutError
from fastdecode.transport.shard_messages import (
    SHARD_CHANNEL,
    Allocate,
    AppendPrompt,
    Attend,
    Configure,
    Free,
    GetStats,
    ShardStats,
)

log = logging.getLogger(__name__)

MAX_APPEND_CHUNK_BYTES = 256 << 20  # a long prompt's K/V travels in chunks of at most this (k and v together)
# Configure pre-faults the whole pool and calibrates it: a third of a host's memory on busy cores took 76 s on the
# 2-core dev VM. The shard answers heartbeats meanwhile (RpcServer, on its loop), so a dead shard is still found
# within the heartbeat window; this only bounds a live one that never finishes.
CONFIGURE_TIMEOUT_S = 3600.0


class ShardClient:
    """An async client of one KVShard.  Safe to use from many tasks of one event loop at once."""

    def __init__(self, rpc: RpcClient, *, ctx: zmq.asyncio.Context, codec: Codec,
                 attend_timeout_s: float | None = None) -> None:
        self._rpc = rpc
        self._ctx = ctx
        self._codec = codec
        self._link: BlockingLink | None = None
        # an attend's reply, at most (None: the client's timeout_s). Heartbeats are answered off the shard's
        # worker, so a worker stuck in a call looks alive: this is what finds it, and the whole step waits meanwhile
        self.attend_timeout_s = attend_timeout_s or rpc.timeout_s

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        ctx: zmq.asyncio.Context | None = None,
        timeout_s: float = 60.0,
        heartbeat_interval_s: float = 1.0,
        liveness: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        attend_timeout_s: float | None = None,
    ) -> ShardClient:
        """Connect and wait for the shard to answer a ping (PeerDeadError if it does not within the window)."""
        ctx = ctx or zmq.asyncio.Context.instance()
        codec = Codec(SHARD_CHANNEL, max_message_bytes=max_message_bytes)
        rpc = RpcClient(address, codec, ctx=ctx, timeout_s=timeout_s, heartbeat_interval_s=heartbeat_interval_s,
                        liveness=liveness, name=f"shard-client {address}")
        rpc.start()
        try:
            await rpc.ping(timeout_s=heartbeat_interval_s * (liveness + 1))
        except RequestTimeoutError:
            await rpc.close()
            raise PeerDeadError(f"no KVShard answers at {address}") from None
        except BaseException:
            await rpc.close()
            raise
        return cls(rpc, ctx=ctx, codec=codec, attend_timeout_s=attend_timeout_s)

    @property
    def address(self) -> str:
        return self._rpc.address

    @property
    def is_alive(self) -> bool:
        return self._rpc.is_alive

    @property
    def instance_id(self) -> int | None:
        """The shard daemon's instance id (its first Pong's; ``connect`` waits for one): two addresses that reach
        one daemon give the same."""
        return self._rpc.peer_instance_id

    @property
    def is_draining(self) -> bool:
        """A heartbeat's Pong said the shard drains (SIGTERM on its daemon): move its sequences away."""
        return self._rpc.is_peer_draining

    async def configure(self, *, num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: str,
                        session_id: int = 0) -> ShardStats:
        """Set the KV shape; ``session_id`` (not 0) frees what another session left (see Configure)."""
        self._rpc.client_id = session_id  # from now on the heartbeats say whose they are (Ping.client_id)
        # and the shard knows this socket's session before its first KV request (shard_drain.DrainableShard.admit)
        await self._rpc.request(Ping(client_id=session_id))
        message = Configure(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, kv_dtype=kv_dtype,
                            session_id=session_id)
        return await self._rpc.request(message, timeout_s=max(self._rpc.timeout_s, CONFIGURE_TIMEOUT_S))

    async def allocate(self, seq_ids: list[int]) -> None:
        await self._rpc.request(Allocate(tuple(int(s) for s in seq_ids)))

    async def free(self, seq_ids: list[int]) -> None:
        await self._rpc.request(Free(tuple(int(s) for s in seq_ids)))

    async def append_prompt(self, seq_id: int, k: np.ndarray, v: np.ndarray) -> None:
        """Ship a prompt's K/V, k and v [L, T, Hkv, D], in token chunks small enough for one message each.

        Chunks are appended in order; if one fails, the earlier ones stay appended
        (free the sequence on error).
        """
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be [L, T, Hkv, D], got {k.shape} and {v.shape}")
        num_tokens = k.shape[1]
        bytes_per_token = 2 * k.nbytes // max(num_tokens, 1)
        chunk = max(1, min(MAX_APPEND_CHUNK_BYTES, self._rpc.max_message_bytes // 2) // max(bytes_per_token, 1))
        for start in range(0, max(num_tokens, 1), chunk):
            part = slice(start, start + chunk)
            await self._rpc.request(AppendPrompt(int(seq_id), k[:, part], v[:, part]))

    async def attend(
        self, layer: int, seq_ids: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, want_lse: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Append k, v [B, Hkv, D] and attend with q [B, Hq, D]; returns (o [B, Hq, D], lse [B, Hq] or None).

        The returned arrays are read-only views on the received frames.  Do not
        modify q, k, v while the call is in flight (they are sent without a copy).
        """
        ids = np.asarray(seq_ids, dtype=np.int64)
        result = await self._rpc.request(Attend(int(layer), ids, q, k, v, bool(want_lse)),
                                         timeout_s=self.attend_timeout_s)
        return result.o, result.lse

    @property
    def link(self) -> BlockingLink:
        """The dense thread's blocking connection to this shard (made on first use; see transport/link.py)."""
        if self._link is None:
            self._link = BlockingLink(self.address, self._codec, ctx=self._ctx, timeout_s=self.attend_timeout_s,
                                   is_alive=lambda: self._rpc.is_alive)
            # The shard takes KV requests only from its session's connections (shard_drain.DrainableShard.admit):
            # this socket names the session first (its Pong comes back as a late reply the link drops).
            self._link.send(Ping(client_id=self._rpc.client_id))
        return self._link

    async def stats(self) -> ShardStats:
        return await self._rpc.request(GetStats())

    async def close(self) -> None:
        await self._rpc.close()
        if self._link is not None:
            self._link.close()


class EmbeddedShard:
    """A KVShard served in this process (``--shards N``); ``await stop()`` ends it.

    Threaded (``is_threaded=True``): the shard's actor loop runs on its own thread and event
    loop, so receiving, decoding and answering its messages never waits behind the
    Executor's callbacks on the Executor's loop (still the same actor, codec and
    inproc:// socket of the caller's zmq Context), and an Attend runs right on that
    thread when the shard's worker is idle (ActorServer ``inline_messages``).
    Otherwise (the default) it shares the caller's loop, and its handlers run on its worker
    thread.  On the 2-core dev machine the shared loop was about 20 % faster and used less
    CPU (docs/benchmarks.md, fan-out micro-benchmark); the H100 host has to decide.
    """

    def __init__(self, server: ActorServer, *, loop: asyncio.AbstractEventLoop | None = None,
                 thread: threading.Thread | None = None) -> None:
        self.server = server
        self._loop = loop
        self._thread = thread

    @property
    def address(self) -> str | None:
        return self.server.address

    @property
    def is_threaded(self) -> bool:
        return self._thread is not None

    async def stop(self) -> None:
        if self._loop is None or self._thread is None:
            await self.server.stop()
            return
        if self._thread.is_alive():
            try:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop))
            finally:
                _end_loop_thread(self._loop, self._thread)
                await asyncio.to_thread(self._thread.join)


def _run_loop_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def _end_loop_thread(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if thread.is_alive() and not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)


async def start_embedded_shard(
    *,
    threads: int | None,
    kv_memory_bytes: int,
    ctx: zmq.asyncio.Context | None = None,
    page_size: int = 32,
    cpu_list: tuple[int, ...] | None = None,
    isa: str | None = None,
    is_calibrating: bool = True,
    slowdown_s_per_gb: float = 0.0,
    is_threaded: bool = False,
) -> tuple[str, EmbeddedShard]:
    """Serve a KVShard over a fresh ``inproc://`` address of ``ctx`` (default: the process-wide Context).

    It goes through the same codec and runtime as a remote shard.  Connect with
    ``ShardClient.connect(address, ctx=<same ctx>)``.  ``is_threaded``: on its own
    thread and event loop (see EmbeddedShard), else on the caller's loop.
    """
    config = ShardConfig(kv_memory_bytes=kv_memory_bytes, num_threads=threads, page_size=page_size,
                         cpu_list=cpu_list, isa=isa, is_calibrating=is_calibrating,
                         slowdown_s_per_gb=slowdown_s_per_gb)
    actor = KVShard(config)
    address = f"inproc://fastdecode-shard-{uuid.uuid4().hex[:16]}"
    ctx = ctx or zmq.asyncio.Context.instance()
    if not is_threaded:
        server = ActorServer(actor, SHARD_CHANNEL, address, ctx=ctx, name="kvshard")
        return await server.start(), EmbeddedShard(server)
    # its loop serves this shard alone: attends run right there while nothing else is queued
    server = ActorServer(actor, SHARD_CHANNEL, address, ctx=ctx, name="kvshard", inline_messages=(Attend,))
    loop = new_event_loop()
    thread = threading.Thread(target=_run_loop_forever, args=(loop,), name="kvshard-loop", daemon=True)
    thread.start()
    try:
        bound = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.start(), loop))
    except BaseException:
        _end_loop_thread(loop, thread)
        await asyncio.to_thread(thread.join)
        raise
    return bound, EmbeddedShard(server, loop=loop, thread=thread)
