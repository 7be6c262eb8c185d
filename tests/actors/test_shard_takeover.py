"""An Executor restarted right after a crash finds its shards still held by the dead one's session (refused
``busy`` until it has been silent for the shard's session timeout): it waits that out instead of failing, and is
refused only when the other session stays live past TAKEOVER_WAIT_S."""
from __future__ import annotations

import pytest

import fastdecode.actors.shard_links as shard_links
from fastdecode.actors.shard_links import ShardLinks
from fastdecode.actors.kv_nodes import ShardKVNode
from fastdecode.actors.kvshard import ShardConfig
from fastdecode.transport.errors import RemoteRequestError


class HeldShard:
    """A ShardClient whose shard refuses Configure ``busy`` the first ``num_refusals`` times."""

    address = "tcp://10.0.0.9:5555"

    def __init__(self, num_refusals: int) -> None:
        self.num_refusals = num_refusals
        self.num_configures = 0
        self.is_closed = False

    async def configure(self, **shape) -> None:
        self.num_configures += 1
        if self.num_configures <= self.num_refusals:
            raise RemoteRequestError("busy", "another Executor (client session) uses this shard")

    async def close(self) -> None:
        self.is_closed = True


@pytest.fixture
def links(monkeypatch):
    monkeypatch.setattr(shard_links, "TAKEOVER_RETRY_S", 0.01)
    return ShardLinks(shape={}, ctx=None, heartbeat_interval_s=1.0, liveness=3, attend_timeout_s=10.0)


def connect_to(monkeypatch, shard: HeldShard):
    async def connect(address, **kwargs):
        return shard

    monkeypatch.setattr(shard_links.ShardClient, "connect", connect)


async def test_a_shard_held_by_a_lapsing_session_is_waited_for(links, monkeypatch, caplog):
    shard = HeldShard(num_refusals=3)
    connect_to(monkeypatch, shard)
    node = await links.connect(shard.address)
    assert isinstance(node, ShardKVNode) and shard.num_configures == 4 and not shard.is_closed
    assert sum("waiting up to" in r.getMessage() for r in caplog.records) == 1


async def test_a_shard_whose_other_session_stays_live_is_refused_in_the_end(links, monkeypatch):
    monkeypatch.setattr(shard_links, "TAKEOVER_WAIT_S", 0.1)
    shard = HeldShard(num_refusals=10**6)
    connect_to(monkeypatch, shard)
    with pytest.raises(RemoteRequestError, match="another Executor"):
        await links.connect(shard.address)
    assert shard.is_closed and shard.num_configures > 1


def test_the_takeover_wait_outlasts_the_shards_session_timeout():
    """README: "an Executor restarted right after a crash waits that out, up to 12 s". A shard refuses the new
    session ``busy`` until the dead one has been silent for its ``session_timeout_s`` (8 s); an Executor that
    gave up sooner, or just as that lapses, with no retry (every TAKEOVER_RETRY_S) left after it, would fail
    every restart that comes right after a crash instead of taking its shards over."""
    session_timeout_s = ShardConfig(kv_memory_bytes=1 << 20).session_timeout_s
    assert shard_links.TAKEOVER_WAIT_S > session_timeout_s + shard_links.TAKEOVER_RETRY_S
    assert (shard_links.TAKEOVER_WAIT_S, session_timeout_s) == (12.0, 8.0)  # the README's figures
