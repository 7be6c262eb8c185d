"""``fdctl start-gpu`` with its only shard daemon gone: the running request ends with a clear error, new
ones get 503 (and /health says why) until a shard is back at the same address, which is then used again."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from daemons import free_port
from fastdecode.actors.shard_daemons import start_shard_daemon, wait_ready
from serve_helpers import TINY_ARGS, LiveServer, metric_values


def start_shard(address: str) -> subprocess.Popen:
    daemon = start_shard_daemon(threads=1, kv_memory="32MiB", listen=address, extra_args=("--no-calibrate",))
    wait_ready(daemon)
    return daemon.proc


def request(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        return response.read().decode()


@pytest.mark.slow
def test_no_shard_left_gives_503_until_one_returns():
    address = f"tcp://127.0.0.1:{free_port()}"
    shard = start_shard(address)
    server = None
    try:
        server = LiveServer(*TINY_ARGS, "--shard", address, "--max-model-len", "2048", command="start-gpu")
        assert request(server.url, "/v1/completions", {"prompt": "hello", "max_tokens": 3})[0] == 200
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(request, server.url, "/v1/completions",
                                  {"prompt": "a long one", "max_tokens": 2000, "ignore_eos": True})
            while metric_values(metrics(server.url), "fastdecode_num_requests_running") != [1.0]:
                assert not running.done(), running.result()
                time.sleep(0.02)
            shard.send_signal(signal.SIGKILL)
            shard.wait()
            status, body = running.result()
        assert status == 503 and "no KV node is left" in body["error"]["message"], body  # try again later
        assert body["error"]["code"] == "unavailable", body
        status, body = request(server.url, "/v1/completions", {"prompt": "refused", "max_tokens": 3})
        assert status == 503 and body["error"]["code"] == "unavailable", body
        assert request(server.url, "/health") == (503, {"status": "no_kv_node"})
        shard = start_shard(address)  # a new process at the same address: a new epoch, an empty pool
        deadline = time.monotonic() + 30
        while request(server.url, "/health")[0] != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        status, body = request(server.url, "/v1/completions", {"prompt": "back", "max_tokens": 5, "min_tokens": 5})
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        assert "is back as epoch 2" in server.log()
    finally:
        if server is not None:
            assert server.stop() == 0, server.log()
        if shard.poll() is None:
            shard.send_signal(signal.SIGTERM)
            assert shard.wait(timeout=30) == 0
