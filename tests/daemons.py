"""Shard daemons for tests: ``fastdecode.actors.shard_daemons`` with the (process, address) pairs tests unpack."""
from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator

from fastdecode.actors import shard_daemons as daemons


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def shard_daemons(count: int, *, threads: int = 1, kv_memory: str = "64MiB",
                  extra_args: tuple[str, ...] = ()) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """``count`` shard daemons on loopback tcp: yields [(process, address)]."""
    with daemons.shard_daemons(count, threads=threads, kv_memory=kv_memory, extra_args=extra_args) as started:
        yield [(d.proc, d.address) for d in started]
