"""CURVE key loading: a public key that is not its secret key's is refused at load, with the two files named."""
from __future__ import annotations

import pytest
import zmq

from fastdecode.transport.security import ClientKeys, CurveKeyError, ServerKeys, write_keys


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
