"""How the Executor reaches shard daemons: plain or CURVE sockets, heartbeats, the attend timeout, and the model's
KV shape each shard is configured for, under one session id for the cluster's run (``ShardLinks``)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastdecode.actors.kv_nodes import ShardKVNode
from fastdecode.actors.kvshard import BUSY
from fastdecode.actors.shard_client import ShardClient
from fastdecode.transport.errors import RemoteRequestError

if TYPE_CHECKING:
    from fastdecode.actors.cluster import ClusterConfig

log = logging.getLogger("fastdecode.cluster")

# A shard held by another Executor session refuses Configure ``busy`` until that session has been silent for the
# shard's session timeout (8 s by default): an Executor restarted right after a crash waits that out (retrying
# every TAKEOVER_RETRY_S) instead of failing, and is refused only if the other one's heartbeats go on.
TAKEOVER_WAIT_S = 12.0
TAKEOVER_RETRY_S = 0.5


@dataclass
class ShardLinks:
    """How the Executor reaches shard daemons: plain or CURVE sockets, heartbeats, and the model's KV shape."""

    shape: dict
    ctx: object | None  # a CURVE client Context, None for the process-wide plain one
    heartbeat_interval_s: float
    liveness: int
    attend_timeout_s: float
    # this cluster's run, the same on every (re)connect: a shard frees what an earlier run left behind
    session_id: int = field(default_factory=lambda: secrets.randbits(63) or 1)

    @classmethod
    def open(cls, config: "ClusterConfig", *, shape: dict) -> "ShardLinks":
        ctx = None
        if config.curve_dir is not None:
            from fastdecode.transport.security import ClientKeys, client_context

            ctx = client_context(ClientKeys.load(config.curve_dir))
        return cls(shape, ctx, config.heartbeat_interval_s, config.liveness, config.attend_timeout_s)

    async def ping(self, address: str) -> int:
        """The instance id of the shard daemon at ``address`` (two addresses that reach one daemon give the same);
        PeerDeadError unless it answers within the heartbeat window."""
        client = await ShardClient.connect(address, ctx=self.ctx, heartbeat_interval_s=self.heartbeat_interval_s,
                                           liveness=self.liveness)
        await client.close()
        return client.instance_id

    async def ping_distinct(self, addresses: tuple[str, ...]) -> None:
        """Ping every shard daemon at once: PeerDeadError unless each answers within the heartbeat window, ValueError
        if two addresses reach one daemon (``tcp://localhost:P`` and ``tcp://127.0.0.1:P``, say): its memory would
        count twice and its pool overflow."""
        instance_ids = await asyncio.gather(*(self.ping(address) for address in addresses))
        seen: dict[int, str] = {}
        for address, instance_id in zip(addresses, instance_ids):
            first = seen.setdefault(instance_id, address)
            if first != address:
                raise ValueError(f"shard addresses {first} and {address} reach the same shard daemon: give each once")

    async def connect(self, address: str) -> ShardKVNode:
        """Connect to a shard (in-process shards share the process-wide Context) and configure it."""
        is_in_process = address.startswith("inproc://")
        # an in-process shard may answer on this process's event loop, which a long handler can hold: its attends
        # keep the client's own timeout rather than fail the only node at a stall of the loop
        client = await ShardClient.connect(address, ctx=None if is_in_process else self.ctx,
                                           heartbeat_interval_s=self.heartbeat_interval_s, liveness=self.liveness,
                                           attend_timeout_s=None if is_in_process else self.attend_timeout_s)
        try:
            await self._configure(client)
        except BaseException:
            await client.close()
            raise
        return ShardKVNode(client)

    async def _configure(self, client: ShardClient) -> None:
        """Configure the shard for this session, waiting up to TAKEOVER_WAIT_S while another session holds it."""
        deadline_s = time.monotonic() + TAKEOVER_WAIT_S
        for attempt in itertools.count():
            try:
                await client.configure(**self.shape, session_id=self.session_id)
                return
            except RemoteRequestError as exc:
                if exc.code != BUSY or time.monotonic() >= deadline_s:
                    raise
                if attempt == 0:
                    log.warning("shard %s: %s; waiting up to %.0f s for that session to lapse", client.address,
                                exc.message, TAKEOVER_WAIT_S)
            await asyncio.sleep(TAKEOVER_RETRY_S)

    async def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
