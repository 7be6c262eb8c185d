"""CURVE on the shard link: an unlisted client key is refused (logged, no message reaches the shard),
a client without CURVE gets nowhere, the listed key works; no keys means loopback only; start-gpu with the
shard's keys serves."""
from __future__ import annotations

import json
import urllib.request

import pytest
import zmq
from click.testing import CliRunner

from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams
from fastdecode.actors.shard_client import ShardClient
from fastdecode.actors.shard_daemons import shard_daemons
from fastdecode.cli.main import main
from fastdecode.transport.client import RpcClient
from fastdecode.transport.codec import Codec
from fastdecode.transport.errors import PeerDeadError, RequestTimeoutError
from fastdecode.transport.security import ClientKeys, CurveKeyError, ServerKeys, client_context, write_keys
from fastdecode.transport.shard_messages import SHARD_CHANNEL, Allocate, Configure
from serve_helpers import TINY_ARGS, LiveServer

SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=16, kv_dtype="float32")


@pytest.mark.slow
async def test_unlisted_key_is_refused_and_logged_listed_key_works(tmp_path):
    write_keys(tmp_path)
    stranger_public, stranger_secret = zmq.curve_keypair()
    stranger_ctx = client_context(ClientKeys(stranger_public, stranger_secret, ServerKeys.load(tmp_path).public))
    good_ctx = client_context(ClientKeys.load(tmp_path))
    try:
        with shard_daemons(1, extra_args=("--no-calibrate", "--curve-dir", str(tmp_path))) as [daemon]:
            address = daemon.address
            stranger = RpcClient(address, Codec(SHARD_CHANNEL), ctx=stranger_ctx, timeout_s=1.0,
                                 heartbeat_interval_s=0.2)
            stranger.start()
            try:
                with pytest.raises((RequestTimeoutError, PeerDeadError)):
                    await stranger.request(Configure(**SHAPE))
                with pytest.raises((RequestTimeoutError, PeerDeadError)):
                    await stranger.request(Allocate((1, 2, 3)))
            finally:
                await stranger.close()
            with pytest.raises(PeerDeadError):  # no CURVE at all: the handshake fails
                await ShardClient.connect(address, heartbeat_interval_s=0.2)
            client = await ShardClient.connect(address, ctx=good_ctx, heartbeat_interval_s=0.2)
            try:
                assert not (await client.stats()).is_configured  # the stranger's Configure never arrived
                await client.configure(**SHAPE)
                await client.allocate([7])
                assert (await client.stats()).num_sequences == 1  # ... nor its Allocate
                await client.free([7])
            finally:
                await client.close()
            log = daemon.log_text()
        assert f"refused a CURVE client with unlisted key {stranger_public.decode()}" in log
        refused = [line for line in log.splitlines() if "refused a CURVE client" in line]
        assert refused and all(line.endswith(stranger_public.decode()) for line in refused)  # only the stranger
    finally:
        stranger_ctx.destroy(linger=0)
        good_ctx.destroy(linger=0)


def test_key_folder_errors_are_clear(tmp_path):
    with pytest.raises(CurveKeyError, match="fdctl keygen"):
        ClientKeys.load(tmp_path)
    write_keys(tmp_path)
    with pytest.raises(CurveKeyError, match="refusing to overwrite"):
        write_keys(tmp_path)
    (tmp_path / "server.public").write_text("not a key\n")
    with pytest.raises(CurveKeyError, match="z85"):
        ServerKeys.load(tmp_path)
    assert oct((tmp_path / "client.secret").stat().st_mode & 0o777) == "0o600"


def test_keygen_command_writes_a_usable_folder(tmp_path):
    result = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    server, client = ServerKeys.load(tmp_path / "keys"), ClientKeys.load(tmp_path / "keys")
    assert client.public in server.authorized and client.server_public == server.public


@pytest.mark.usefixtures("root_log_level_restored")  # start-shard in-process sets it from --log-level
def test_without_keys_daemons_bind_only_to_loopback():
    runner = CliRunner(env={"FASTDECODE_API_KEY": None})  # a key in the caller's environment would let serve run
    result = runner.invoke(main, ["start-shard", "--listen", "tcp://0.0.0.0:0", "--kv-memory", "16MiB"])
    assert result.exit_code == 2 and "--insecure-bind-any" in result.output
    result = runner.invoke(main, ["serve", "--model", "random:tiny", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2 and "--insecure-bind-any" in result.output


def test_start_gpu_with_the_shards_keys_serves_a_request(tmp_path, tiny_model):
    """The README's pair on loopback: ``start-shard --curve-dir keys/`` and ``start-gpu --shard ... --curve-dir
    keys/`` with the folder ``fdctl keygen`` wrote; a completion goes through the encrypted link, greedy text as
    the reference engine's, and the shard refused no client."""
    keys = tmp_path / "keys"
    result = CliRunner().invoke(main, ["keygen", "--out", str(keys)])
    assert result.exit_code == 0, result.output
    with shard_daemons(1, extra_args=("--no-calibrate", "--curve-dir", str(keys))) as [daemon]:
        with LiveServer(*TINY_ARGS, "--shard", daemon.address, "--curve-dir", str(keys), command="start-gpu") as server:
            body = json.dumps({"prompt": "Hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True})
            request = urllib.request.Request(server.url + "/v1/completions", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                text = json.loads(response.read())["choices"][0]["text"]
        log = daemon.log_text()
    assert "refused a CURVE client" not in log, log
    model, tokenizer = tiny_model
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert text == reference_generate(model, tokenizer, tokenizer.encode("Hello"), params).text
