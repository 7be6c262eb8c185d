"""``fdctl start-shard`` daemons as child processes on this host, for benchmarks and tests.

Each daemon's stderr goes to a log file (a pipe nobody reads would stall a
daemon that logs a lot); its address is read from the ``ready <address>`` line.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FDCTL = [sys.executable, "-m", "fastdecode.cli.main"]


class ShardDaemonError(RuntimeError):
    """A daemon exited or stayed silent instead of printing its ready line."""


@dataclass
class ShardDaemon:
    proc: subprocess.Popen
    log_path: Path
    address: str = ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_shard_daemon(*, threads: int, kv_memory: str, listen: str = "tcp://127.0.0.1:0",
                       cpu_list: Sequence[int] | None = None, extra_args: Sequence[str] = (),
                       command_prefix: Sequence[str] = ()) -> ShardDaemon:
    """Start one daemon (behind ``command_prefix``, e.g. ``ip netns exec NS``); ``wait_ready`` gives its address."""
    args = [*command_prefix, *FDCTL, "start-shard", "--listen", listen, "--threads", str(threads), "--kv-memory", kv_memory]
    if cpu_list:
        args += ["--cpu-list", ",".join(map(str, cpu_list))]
    fd, name = tempfile.mkstemp(prefix="fdctl-shard-", suffix=".log")
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen([*args, *extra_args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return ShardDaemon(proc, Path(name))


def wait_ready(daemon: ShardDaemon, timeout_s: float = 120.0) -> str:
    """Block until the daemon's ``ready <address>`` line; its address."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = daemon.log_text()
        ready = [line for line in text.splitlines() if line.startswith("ready ")]
        if ready:
            daemon.address = ready[0].split(maxsplit=1)[1].strip()
            return daemon.address
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            stop_shard_daemons([daemon])
            raise ShardDaemonError(f"shard daemon did not start (exit {daemon.proc.poll()}): {text[-800:]}")
        time.sleep(0.02)


def stop_shard_daemons(daemons: Sequence[ShardDaemon], timeout_s: float = 30.0) -> None:
    """SIGTERM each running daemon, wait (SIGKILL past ``timeout_s``), remove the logs."""
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
    for daemon in daemons:
        try:
            daemon.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
        daemon.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def shard_daemons(count: int, *, threads: int = 1, kv_memory: str = "64MiB",
                  cpu_lists: Sequence[Sequence[int] | None] | None = None,
                  extra_args: Sequence[str] = ()) -> Iterator[list[ShardDaemon]]:
    """``count`` ready daemons on loopback tcp, stopped on exit whatever happens."""
    daemons: list[ShardDaemon] = []
    try:
        for index in range(count):
            cpu_list = cpu_lists[index] if cpu_lists else None
            daemons.append(start_shard_daemon(threads=threads, kv_memory=kv_memory, cpu_list=cpu_list,
                                              extra_args=extra_args))
        for daemon in daemons:
            wait_ready(daemon)
        yield daemons
    finally:
        stop_shard_daemons(daemons)
