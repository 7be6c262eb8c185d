"""``fdctl client`` against a live server: tokens printed as they arrive, a summary, one-line errors."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import socket
import subprocess
from pathlib import Path

import pytest

_HELPER = Path(__file__).resolve().parents[1] / "actors" / "frontend" / "live_server.py"
_spec = importlib.util.spec_from_file_location("frontend_live_server", _HELPER)
live_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live_server)

KEY = "client-key"
PROMPT = "The capital of France is"
SUMMARY = re.compile(r"^(\d+) tokens, time to first token \d+ ms, [\d.]+ tokens/s \(finish: (\w+)\)$")


@pytest.fixture(scope="module")
def server():
    with live_server.LiveServer(*live_server.TINY_ARGS, "--shards", "0", "--api-key", KEY) as running:
        yield running


def client(*args: str) -> list[str]:
    return [live_server.FDCTL, "client", *args]


def first_read(*args: str) -> tuple[bytes, bool, subprocess.CompletedProcess]:
    """Run ``fdctl client``: its stdout's first bytes, read as soon as there are any; whether it was still running
    then; and the whole run (stdout in full, bytes)."""
    process = subprocess.Popen(client(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "no output within 60 s"
        first = os.read(process.stdout.fileno(), 1 << 20)  # what the pipe holds now, not a readline's wait
        was_running = process.poll() is None
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return first, was_running, subprocess.CompletedProcess(process.args, process.returncode, first + rest, stderr)


def test_tokens_arrive_before_the_stream_ends(server):
    """The client flushes each line: a block-buffered stdout would give its first 8 KiB at once (about 160 of
    these lines), or everything at exit."""
    first, was_running, result = first_read("--url", server.ws_url, "--api-key", KEY, "--max-tokens", "400",
                                            "--ignore-eos", "--jsonl", PROMPT)
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [m["type"] for m in messages] == ["token"] * 400 + ["done"]
    assert first.endswith(b"\n") and json.loads(first.splitlines()[0])["type"] == "token"
    num_first_lines = first.count(b"\n")
    assert num_first_lines < 100, f"{num_first_lines} of 401 lines came at once"
    assert was_running, "the client had already finished: output was not incremental"
    summary = SUMMARY.match(result.stderr.decode().strip().splitlines()[-1])
    assert summary and summary.group(1) == "400" and summary.group(2) == "length"


def test_plain_text_arrives_before_the_stream_ends(server):
    """The README's default output, token text only, is flushed token by token too (here well under 8 KiB in all:
    a client that buffered it would give it at exit, in one piece)."""
    first, was_running, result = first_read("--url", server.ws_url, "--api-key", KEY, "--max-tokens", "400",
                                            "--ignore-eos", PROMPT)
    assert result.returncode == 0, result.stderr
    assert 0 < len(first) < len(result.stdout) // 4, (len(first), len(result.stdout))
    assert was_running, "the client had already finished: output was not incremental"
    assert SUMMARY.match(result.stderr.decode().strip().splitlines()[-1]).group(1) == "400"


def test_plain_output_is_the_greedy_text(server, tiny_model):
    from fastdecode.actors.reference import reference_generate
    from fastdecode.actors.request import SamplingParams

    model, tokenizer = tiny_model
    expected = reference_generate(model, tokenizer, tokenizer.encode(PROMPT),
                                  SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    result = subprocess.run(client("--url", server.ws_url, "--api-key", KEY, "--max-tokens", "20", "--ignore-eos",
                                   PROMPT), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert SUMMARY.match(result.stderr.strip().splitlines()[-1]).group(1) == "20"


def test_the_api_key_may_come_from_the_environment(server):
    """FASTDECODE_API_KEY stands for --api-key, as for ``fdctl serve``."""
    for key, is_accepted in ((KEY, True), ("wrong", False)):
        result = subprocess.run(client("--url", server.ws_url, "--max-tokens", "3", PROMPT), capture_output=True,
                                text=True, timeout=60, env={**os.environ, "FASTDECODE_API_KEY": key})
        if is_accepted:
            assert result.returncode == 0, result.stderr
            assert SUMMARY.match(result.stderr.strip().splitlines()[-1]).group(1) == "3"
        else:
            assert result.returncode == 2 and "HTTP 401" in result.stderr, result.stderr


def test_chat_mode(server):
    result = subprocess.run(client("--url", server.ws_url, "--api-key", KEY, "--max-tokens", "5", "--chat", "Hi"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert SUMMARY.match(result.stderr.strip())


def _one_line_failure(*args: str) -> str:
    result = subprocess.run(client(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_wrong_key_is_one_line(server):
    assert "HTTP 401" in _one_line_failure("--url", server.ws_url, "--api-key", "wrong", "hello")


def test_server_error_is_one_line(server):
    assert "temperature" in _one_line_failure("--url", server.ws_url, "--api-key", KEY, "--temperature", "-1", "x")


def test_nothing_listening_is_one_line():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert "cannot stream" in _one_line_failure("--url", f"ws://127.0.0.1:{port}/v1/stream", "hello")
