"""Three shard daemons (separate processes), 16 streaming greedy requests, one shard lost mid-generation
(SIGKILL, or its network link cut inside its own network namespace): every request completes with
exactly its solo tokens and the recovered counter moves."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile

import pytest

from daemons import shard_daemons
from fastdecode.actors.shard_daemons import shard_daemons as started_daemons
from fastdecode.actors.shard_daemons import start_shard_daemon, stop_shard_daemons, wait_ready
from fastdecode.actors.cluster import Cluster, ClusterConfig
from fastdecode.actors.frontend.metrics import FrontendMetrics
from fastdecode.actors.request import SamplingParams
from fastdecode.transport.security import write_keys
from greedy_compare import assert_same_greedy
from reliability_helpers import reference_greedy

TINY = dict(model="random:tiny", seed=0, dtype="float32", device="cpu")
HEARTBEATS = dict(heartbeat_interval_s=0.2, liveness=3)  # a lost shard is noticed within 0.8 s
NUM_REQUESTS = 16


def make_requests(model) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(11)
    return [([rng.randrange(3, model.config.vocab_size) for _ in range(rng.randrange(4, 32))],
             SamplingParams(max_tokens=rng.randrange(120, 160), temperature=0.0, ignore_eos=True))
            for _ in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def failover_references(tiny_model):
    model, _ = tiny_model
    return [reference_greedy(model, p, s.max_tokens) for p, s in make_requests(model)]


async def run_with_a_lost_shard(config: ClusterConfig, model, lose_shard) -> tuple[list[list[int]], int, str]:
    """Stream every request; once each has some tokens, ``lose_shard(index)`` the busiest shard."""
    requests = make_requests(model)
    async with await Cluster.start(config) as cluster:
        streams = [cluster.submit(p, s) for p, s in requests]
        tokens: list[list[int]] = [[] for _ in streams]
        reasons: list[str | None] = [None] * len(streams)
        started = asyncio.Event()

        async def read(i, stream):
            async for event in stream:
                if event.token_id >= 0:
                    tokens[i].append(event.token_id)
                reasons[i] = event.finish_reason
                if sum(len(t) >= 5 for t in tokens) == len(streams):
                    started.set()

        readers = asyncio.gather(*(read(i, s) for i, s in enumerate(streams)))
        await asyncio.wait_for(started.wait(), 60)
        stats = await asyncio.gather(*(n.client.stats() for n in cluster.executor.nodes))
        victim = max(range(len(stats)), key=lambda i: stats[i].num_sequences)
        assert stats[victim].num_sequences > 0
        lose_shard(victim)
        await asyncio.wait_for(readers, 120)
        assert reasons == ["length"] * len(streams), reasons
        assert not cluster.executor.nodes[victim].is_alive
        assert all(used == 0 for used in await cluster.kv_used_bytes())  # the survivors hold nothing now
        metrics = (await FrontendMetrics("random:tiny").render(cluster)).decode()
        return tokens, cluster.executor.num_recovered, metrics


def check(tokens, references, requests, num_recovered, metrics, label):
    assert num_recovered > 0
    match = re.search(r"^fastdecode_sequences_recovered_total\{model_name=\"random:tiny\"\} (\S+)$", metrics, re.M)
    assert match and float(match.group(1)) == num_recovered
    for i, ((prompt, params), ours, (ref, gaps)) in enumerate(zip(requests, tokens, references)):
        assert len(ours) == params.max_tokens
        assert_same_greedy(ours, ref, gaps, label=f"{label} request {i}")


@pytest.mark.slow
async def test_sigkilled_shard_daemon_loses_no_token(tiny_model, failover_references):
    model, _ = tiny_model
    with shard_daemons(3, kv_memory="32MiB", extra_args=("--no-calibrate",)) as daemons:
        config = ClusterConfig(**TINY, shard_addresses=tuple(a for _, a in daemons), **HEARTBEATS)
        tokens, num_recovered, metrics = await run_with_a_lost_shard(
            config, model, lambda i: daemons[i][0].send_signal(signal.SIGKILL))
    check(tokens, failover_references, make_requests(model), num_recovered, metrics, "SIGKILL")


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    name = f"fdprobe{os.getpid() % 100000}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@contextlib.contextmanager
def shards_in_namespaces(count: int, curve_dir: str):
    """``count`` shard daemons, each in its own network namespace behind a veth pair:
    yields [(process, address, host-side link name)]."""
    tag = os.getpid() % 10000
    made, started = [], []

    def ip(*args, ns=None):
        prefix = ["ip", "netns", "exec", ns] if ns else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    try:
        daemons = []
        for i in range(count):
            ns, host_link, ns_link = f"fdr{tag}n{i}", f"fd{tag}h{i}", f"fd{tag}s{i}"
            subnet = f"10.{200 + i}.{tag % 250}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", host_link, "type", "veth", "peer", "name", ns_link, "netns", ns)
            ip("addr", "add", f"{subnet}.1/24", "dev", host_link)
            ip("link", "set", host_link, "up")
            ip("addr", "add", f"{subnet}.2/24", "dev", ns_link, ns=ns)
            ip("link", "set", ns_link, "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
            daemon = start_shard_daemon(threads=1, kv_memory="32MiB", listen=f"tcp://{subnet}.2:5555",
                                        extra_args=("--no-calibrate", "--curve-dir", curve_dir),
                                        command_prefix=("ip", "netns", "exec", ns))
            started.append(daemon)
            daemons.append((daemon.proc, wait_ready(daemon), host_link))
        yield daemons
    finally:
        for daemon in started:
            daemon.proc.kill()
        stop_shard_daemons(started)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth pair along


@pytest.mark.slow
async def test_cut_link_to_a_shard_in_its_own_namespace_loses_no_token(tiny_model, failover_references):
    reason = _netns_unavailable()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    model, _ = tiny_model
    with tempfile.TemporaryDirectory() as keys:
        write_keys(keys)  # non-loopback links: CURVE-encrypted, as a deployment would run them
        with shards_in_namespaces(3, keys) as daemons:
            config = ClusterConfig(**TINY, shard_addresses=tuple(a for _, a, _ in daemons), curve_dir=keys,
                                   **HEARTBEATS)

            def cut(i):
                subprocess.run(["ip", "link", "set", daemons[i][2], "down"], check=True)

            tokens, num_recovered, metrics = await run_with_a_lost_shard(config, model, cut)
            assert all(proc.poll() is None for proc, _, _ in daemons)  # the cut shard is alive, unreachable
    check(tokens, failover_references, make_requests(model), num_recovered, metrics, "cut link")


@pytest.mark.slow
async def test_sigterm_on_a_shard_moves_its_sequences_away_then_it_exits_0(tiny_model, failover_references):
    model, _ = tiny_model
    with started_daemons(3, kv_memory="32MiB", extra_args=("--no-calibrate",)) as daemons:
        config = ClusterConfig(**TINY, shard_addresses=tuple(d.address for d in daemons), **HEARTBEATS)
        drained: list[int] = []

        def drain(i):
            drained.append(i)
            daemons[i].proc.send_signal(signal.SIGTERM)

        tokens, num_recovered, metrics = await run_with_a_lost_shard(config, model, drain)
        daemon = daemons[drained[0]]
        assert daemon.proc.wait(timeout=30) == 0
        log = daemon.log_text()
        assert "draining:" in log and "not moved away" not in log, log
    check(tokens, failover_references, make_requests(model), num_recovered, metrics, "SIGTERM drain")
