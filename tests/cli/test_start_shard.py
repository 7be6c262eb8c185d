"""``fdctl start-shard`` as a real subprocess: ready line, exact attend over tcp, timeouts, SIGKILL, SIGTERM."""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest
import zmq.asyncio
from click.testing import CliRunner

from fastdecode.actors.shard_client import ShardClient
from fastdecode.cli.sizes import parse_size
from fastdecode.cli.start_shard import check_listen_address, parse_cpu_list, start_shard
from fastdecode.native.lib import KVPool
from fastdecode.transport.errors import PeerDeadError, RemoteRequestError, RequestTimeoutError

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.usefixtures("root_log_level_restored")]  # start_shard in-process sets it from --log-level

BF16 = np.dtype(ml_dtypes.bfloat16)
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, NUM_Q_HEADS = 2, 2, 64, 8


class ShardDaemon:
    """``fdctl start-shard`` in a subprocess; a thread collects its stderr lines."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "fastdecode.cli.main", "start-shard", "--listen", "tcp://127.0.0.1:0",
                   "--kv-memory", "32MiB", "--threads", "1", *args]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.seen: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=30)
            except queue.Empty:
                line = None
            if line is None:
                self.proc.kill()
                raise AssertionError(f"no ready line; stderr so far: {self.seen}")
            self.seen.append(line)
            if line.startswith("ready "):
                self.address = line.split()[1]
                return

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def finish(self, timeout: float = 20) -> tuple[int, list[str]]:
        returncode = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        while (line := self.lines.get_nowait() if not self.lines.empty() else None) is not None:
            self.seen.append(line)
        return returncode, self.seen


def _rand(rng, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(BF16)


async def test_daemon_serves_exact_attention_and_exits_0_on_sigterm() -> None:
    daemon = ShardDaemon()
    ctx = zmq.asyncio.Context()
    try:
        assert daemon.address.startswith("tcp://127.0.0.1:") and not daemon.address.endswith(":0")
        client = await ShardClient.connect(daemon.address, ctx=ctx, heartbeat_interval_s=0.2)
        stats = await client.configure(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                                       kv_dtype="bfloat16")
        assert stats.capacity_bytes <= 32 << 20 and stats.num_threads == 1 and stats.calibrated_gbps > 0
        rng = np.random.default_rng(0)
        reference = KVPool(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype="bfloat16",
                           capacity_bytes=32 << 20, num_threads=1)
        seq_ids = np.array([7, 8, 9], np.int64)
        await client.allocate(seq_ids.tolist())
        for seq_id, length in zip(seq_ids.tolist(), (1, 33, 100)):
            k = _rand(rng, (NUM_LAYERS, length, NUM_KV_HEADS, HEAD_DIM))
            v = _rand(rng, (NUM_LAYERS, length, NUM_KV_HEADS, HEAD_DIM))
            await client.append_prompt(seq_id, k, v)
            reference.allocate(seq_id)
            reference.append(seq_id, None, k, v)
        for layer in (0, 1, 0):
            q = _rand(rng, (3, NUM_Q_HEADS, HEAD_DIM))
            k, v = _rand(rng, (3, NUM_KV_HEADS, HEAD_DIM)), _rand(rng, (3, NUM_KV_HEADS, HEAD_DIM))
            o, lse = await client.attend(layer, seq_ids, q, k, v, want_lse=True)
            expected_lse = np.empty((3, NUM_Q_HEADS), np.float32)
            expected = reference.attend(layer, seq_ids, q, k, v, lse=expected_lse)
            assert np.array_equal(o.view(np.uint16), expected.view(np.uint16))  # bitwise
            assert np.array_equal(lse, expected_lse)
        reference.close()
        assert (await client.stats()).num_attend_calls == 3
        await client.close()
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        returncode, lines = daemon.finish()
        ctx.destroy(linger=0)
    assert returncode == 0
    assert sum(line.startswith("ready ") for line in lines) == 1
    assert any("stopped" in line for line in lines)


async def test_stalled_daemon_times_out_then_killed_daemon_is_dead_within_window() -> None:
    daemon = ShardDaemon("--no-calibrate")
    ctx = zmq.asyncio.Context()
    interval, liveness = 0.4, 3  # a 1.6 s window: timer delays on a loaded 2-core CI box stay well inside it
    try:
        impatient = await ShardClient.connect(daemon.address, ctx=ctx, heartbeat_interval_s=interval,
                                              liveness=liveness, timeout_s=0.1)
        patient = await ShardClient.connect(daemon.address, ctx=ctx, heartbeat_interval_s=interval,
                                            liveness=liveness, timeout_s=30.0)
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # alive but silent: the request times out first
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await impatient.stats()
        assert time.monotonic() - start < 0.5
        os.kill(daemon.proc.pid, signal.SIGCONT)
        await impatient.stats()  # answers again
        assert impatient.is_alive and patient.is_alive

        os.kill(daemon.proc.pid, signal.SIGSTOP)  # so that the requests below are surely in flight
        waiting = asyncio.gather(*(patient.stats() for _ in range(3)), return_exceptions=True)
        await asyncio.sleep(0.05)
        os.kill(daemon.proc.pid, signal.SIGKILL)
        start = time.monotonic()
        results = await waiting  # only the heartbeats can end these (their timeout is 30 s)
        elapsed = time.monotonic() - start
        assert all(isinstance(r, PeerDeadError) for r in results), results
        assert elapsed <= (liveness + 1) * interval + 0.3, elapsed
        assert not patient.is_alive
        with pytest.raises(PeerDeadError):
            await patient.stats()
        await impatient.close()
        await patient.close()
    finally:
        daemon.proc.kill()
        daemon.finish()
        ctx.destroy(linger=0)


def test_cli_argument_errors_are_clear() -> None:
    runner = CliRunner()
    result = runner.invoke(start_shard, ["--listen", "tcp://127.0.0.1:0", "--kv-memory", "12 parsecs"])
    assert result.exit_code == 2 and "unknown size unit" in result.output
    result = runner.invoke(start_shard, ["--listen", "udp://x", "--kv-memory", "1GiB"])
    assert result.exit_code == 2 and "tcp://" in result.output
    result = runner.invoke(start_shard, ["--listen", "tcp://127.0.0.1:0", "--kv-memory", "1GiB", "--cpu-list", "3-1"])
    assert result.exit_code == 2 and "backwards" in result.output
    assert parse_cpu_list("0-2,5") == (0, 1, 2, 5)
    assert parse_size("256MiB") == 256 << 20 and parse_size("16GiB") == 16 << 30 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="less than one byte"):
        parse_size("0")
    with pytest.raises(ValueError, match=r"more than 2\*\*62 bytes"):  # would wrap in the pool's int64
        parse_size("4194305TiB")
    assert parse_size("4194304TiB") == 1 << 62


@pytest.mark.parametrize("args, message", [
    (["--page-size", "48"], "page_size must be a multiple of 16"),
    (["--page-size", "8"], "page_size must be a multiple of 16"),
    (["--threads", "5000"], r"num_threads must be an integer in [1, 4096]"),
    (["--cpu-list", "0,4000"], "CPU(s) [4000] that this process may not run on"),
    (["--kv-memory", "1000000TiB"], "physical memory"),
    (["--kv-memory", "5000000TiB"], "more than 2**62 bytes"),
])
def test_values_the_pool_cannot_use_are_refused_before_ready(args, message) -> None:
    """One ``Error:`` line and exit 2 at start, not ``ready`` and then a failed Configure from the GPU host."""
    result = CliRunner().invoke(start_shard, ["--listen", "tcp://127.0.0.1:0", "--kv-memory", "32MiB", *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0] and "ready" not in result.output


@pytest.mark.parametrize("listen, message", [
    ("tcp://127.0.0.1:99999", "port '99999' of 'tcp://127.0.0.1:99999' is not in 1..65535"),  # ZeroMQ wrapped it
    ("tcp://127.0.0.1:65536", "is not in 1..65535"),
    ("tcp://127.0.0.1:-1", "is not in 1..65535"),
    ("tcp://127.0.0.1:http", "is not in 1..65535"),
    ("tcp://127.0.0.1", "use tcp://HOST:PORT"),
    ("tcp://[::1]", "use tcp://HOST:PORT"),
    ("ipc://", "names no path"),
])
def test_a_listen_address_it_cannot_bind_as_given_is_refused_before_binding(listen, message) -> None:
    result = CliRunner().invoke(start_shard, ["--listen", listen, "--kv-memory", "32MiB", "--no-calibrate"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0] and "ready" not in result.output


@pytest.mark.parametrize("listen", ["tcp://127.0.0.1:0", "tcp://127.0.0.1:*", "tcp://127.0.0.1:1",
                                    "tcp://127.0.0.1:65535", "tcp://[::1]:5555", "tcp://*:5555", "ipc:///tmp/s"])
def test_listen_addresses_zeromq_binds_as_given_are_accepted(listen) -> None:
    check_listen_address(listen)  # raises ValueError otherwise


def test_a_busy_port_is_one_error_line_and_exit_2() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        result = CliRunner().invoke(start_shard, ["--listen", listen, "--kv-memory", "32MiB", "--no-calibrate"])
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "ERROR" in line]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(errors) == 1 and errors[0].startswith(f"Error: kvshard: cannot bind {listen}: Address already in use")
    assert not any(line.startswith("ready ") for line in result.output.splitlines())


async def test_an_idle_executor_keeps_its_shard_through_heartbeats() -> None:
    """A live Executor with nothing to run sends only heartbeats: another session's Configure is refused ``busy``
    (it used to be let in when the shard held no sequence, and re-created the pool under the first one). Once
    the first closes, the next one is let in at once."""
    daemon = ShardDaemon("--no-calibrate")
    ctx = zmq.asyncio.Context()
    try:
        holder = await ShardClient.connect(daemon.address, ctx=ctx, heartbeat_interval_s=0.1)
        shape = dict(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype="bfloat16")
        await holder.configure(**shape, session_id=1)
        await asyncio.sleep(0.3)  # heartbeats only
        other = await ShardClient.connect(daemon.address, ctx=ctx)
        with pytest.raises(RemoteRequestError) as info:
            await other.configure(**shape, session_id=2)
        assert info.value.code == "busy" and "heartbeat" in str(info.value)
        assert (await holder.configure(**shape, session_id=1)).is_configured
        await holder.close()  # a clean stop says goodbye: the next Executor need not wait out its silence
        assert (await other.configure(**shape, session_id=2)).is_configured
        await other.close()
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.finish()
        ctx.destroy(linger=0)


async def test_a_second_executor_is_refused_with_one_line_while_the_first_runs() -> None:
    """A start-gpu whose shard is in use by a live Executor (another session) stops with one line at start, and
    the first Executor's sequences stay."""
    daemon = ShardDaemon("--no-calibrate")
    ctx = zmq.asyncio.Context()
    gpu = None
    try:
        holder = await ShardClient.connect(daemon.address, ctx=ctx, heartbeat_interval_s=0.2)
        await holder.configure(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                               kv_dtype="bfloat16", session_id=1)
        await holder.allocate([7])
        is_done = asyncio.Event()

        async def keep_working() -> None:  # the first Executor's steps
            while not is_done.is_set():
                await holder.allocate([8])
                await holder.free([8])
                await asyncio.sleep(0.2)

        working = asyncio.create_task(keep_working())
        gpu = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastdecode.cli.main", "start-gpu", "--model", "random:tiny", "--dtype", "float32",
            "--device", "cpu", "--port", "0", "--shard", daemon.address,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = await asyncio.wait_for(gpu.communicate(), 45)
        is_done.set()
        await working
        stderr = stderr.decode()
        assert gpu.returncode == 2, stderr
        error = [line for line in stderr.splitlines() if line.startswith("Error: ")]
        assert len(error) == 1 and "a shard refused this Executor: another Executor" in error[0], stderr
        assert "Traceback" not in stderr
        assert (await holder.stats()).num_sequences == 1
        await holder.free([7])
        await holder.close()
    finally:
        if gpu is not None and gpu.returncode is None:  # it served: the old Executor's sequences were wiped
            gpu.kill()
            await gpu.wait()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.finish()
        ctx.destroy(linger=0)


async def test_a_further_signal_stops_waiting_for_the_request_under_way() -> None:
    """server.stop() waits for the handler that runs (a Configure calibrating a large pool takes a minute); a second
    SIGTERM/SIGINT used to do nothing then. The stop now gives up a short grace after one."""
    from fastdecode.cli.start_shard import stop_unless_hurried

    class Server:
        def __init__(self, stop_s: float) -> None:
            self.stop_s = stop_s

        async def stop(self) -> None:
            await asyncio.sleep(self.stop_s)

    hurry = asyncio.Event()
    assert await stop_unless_hurried(Server(0.01), hurry, grace_s=0.05)  # a quick stop: waited for
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, hurry.set)
    start = time.monotonic()
    assert not await stop_unless_hurried(Server(60.0), hurry, grace_s=0.05)
    assert time.monotonic() - start < 1.0
    assert not await stop_unless_hurried(Server(60.0), hurry, grace_s=0.05)  # hurried before: the grace only
