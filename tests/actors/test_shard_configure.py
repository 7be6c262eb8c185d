"""Configure may take longer than a request's timeout: the pool is pre-faulted and calibrated, and a third of a
busy host's memory took 76 s. A live shard (it answers heartbeats meanwhile) is waited for."""
from __future__ import annotations

import time

import zmq.asyncio

from fastdecode.actors.kvshard import KVShard
from fastdecode.actors.shard_client import ShardClient, start_embedded_shard
from fastdecode.cli.errors import shard_error_message
from fastdecode.transport.errors import PeerDeadError


async def test_a_configure_slower_than_the_request_timeout_is_waited_for(monkeypatch) -> None:
    slow = KVShard.on_configure

    def on_configure(self, message):
        time.sleep(0.6)  # on the shard's worker thread, as the pre-fault and calibration run
        return slow(self, message)

    monkeypatch.setattr(KVShard, "on_configure", on_configure)
    ctx = zmq.asyncio.Context()
    address, handle = await start_embedded_shard(threads=1, kv_memory_bytes=4 << 20, ctx=ctx, is_threaded=True,
                                                 is_calibrating=False)
    try:
        client = await ShardClient.connect(address, ctx=ctx, timeout_s=0.2, heartbeat_interval_s=0.05)
        stats = await client.configure(num_layers=2, num_kv_heads=2, head_dim=64, kv_dtype="float32")
        assert stats.is_configured
        await client.close()
    finally:
        await handle.stop()
        ctx.term()


def test_an_in_process_shard_failure_gives_no_network_hints() -> None:
    line = shard_error_message(PeerDeadError("no KVShard answers at inproc://fastdecode-shard-ab"))
    assert line.startswith("the in-process KV shard failed") and "firewall" not in line and "CURVE" not in line
    assert "firewall" in shard_error_message(PeerDeadError("no KVShard answers at tcp://10.0.0.2:5555"))
