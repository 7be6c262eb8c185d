"""Start real ``fdctl start-shard`` daemons for tests, and stop them whatever happens."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

FDCTL = [sys.executable, "-m", "fastdecode.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """Read the daemon's stderr until its ``ready <address>`` line; return the address."""
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if line.startswith("ready "):
            return line.split(maxsplit=1)[1].strip()
    proc.kill()
    raise RuntimeError("shard daemon did not become ready:\n" + "".join(lines))


@contextlib.contextmanager
def shard_daemons(count: int, *, threads: int = 1, kv_memory: str = "64MiB",
                  extra_args: tuple[str, ...] = ()) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """``count`` shard daemons on loopback tcp: yields [(process, address)]."""
    procs: list[subprocess.Popen] = []
    try:
        daemons = []
        for _ in range(count):
            address = f"tcp://127.0.0.1:{free_port()}"
            proc = subprocess.Popen(
                [*FDCTL, "start-shard", "--listen", address, "--threads", str(threads), "--kv-memory", kv_memory,
                 *extra_args],
                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            procs.append(proc)
            daemons.append((proc, wait_ready(proc)))
        yield daemons
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
