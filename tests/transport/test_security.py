"""CURVE key loading: a public key that is not its secret key's is refused at load, with the two files named; a
burst of handshakes with an unlisted key leaves a log line per interval, not one per refusal."""
from __future__ import annotations

import pytest
import zmq
import zmq.asyncio
from polling import until

from fastdecode.transport.codec import Codec
from fastdecode.transport.security import ClientKeys, CurveKeyError, ServerKeys, server_context, write_keys
from fastdecode.transport.server import RpcServer
from fastdecode.transport.shard_messages import SHARD_CHANNEL


def test_key_pairs_that_belong_together_load(tmp_path) -> None:
    write_keys(tmp_path)
    server, client = ServerKeys.load(tmp_path), ClientKeys.load(tmp_path)
    assert zmq.curve_public(server.secret) == server.public and zmq.curve_public(client.secret) == client.public
    assert client.server_public == server.public


@pytest.mark.parametrize("public_name, secret_name, load", [
    ("server.public", "server.secret", ServerKeys.load),
    ("client.public", "client.secret", ClientKeys.load),
])
def test_a_public_key_from_another_pair_is_refused(tmp_path, public_name, secret_name, load) -> None:
    """A folder assembled from two keygen runs used to load, and then every handshake failed silently."""
    write_keys(tmp_path)
    other_public, _ = zmq.curve_keypair()
    (tmp_path / public_name).write_text(other_public.decode("ascii") + "\n")
    with pytest.raises(CurveKeyError, match=f"{public_name} is not the public key of .*{secret_name}"):
        load(tmp_path)


@pytest.mark.timeout(30)
async def test_a_burst_of_refused_handshakes_leaves_a_few_log_lines(tmp_path, caplog) -> None:
    """Anyone who can reach the port can open connections with an unlisted key as fast as it likes: each refusal is
    counted, but the log gets a line per interval (with the count held back), as with junk messages
    (transport/server.py)."""
    write_keys(tmp_path)
    keys = ServerKeys.load(tmp_path)
    security = server_context(keys)
    server = RpcServer("tcp://127.0.0.1:0", Codec(SHARD_CHANNEL), lambda peer, request_id, message: None,
                       ctx=security.ctx)
    address = await server.start()
    stranger = zmq.asyncio.Context()
    stranger.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
    public, secret = zmq.curve_keypair()  # listed nowhere
    stranger.setsockopt(zmq.CURVE_PUBLICKEY, public)
    stranger.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sockets = [stranger.socket(zmq.DEALER) for _ in range(50)]
    try:
        for sock in sockets:
            sock.connect(address)  # each connection's handshake is refused once
        await until(lambda: security.num_refused == 50, timeout_s=10.0)
        lines = [r for r in caplog.records if "refused a CURVE client" in r.getMessage()]
        assert 1 <= len(lines) <= 2
    finally:
        stranger.destroy(linger=0)
        await server.close()
        security.close()
