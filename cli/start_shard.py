"""``fdctl start-shard``: run one KVShard as a daemon on a CPU host.

    fdctl start-shard --listen tcp://0.0.0.0:5555 --threads 16 --kv-memory 64GiB

Logs go to stderr; once the shard accepts requests it prints exactly one line
``ready <address>`` on stderr (a ``:0`` port is resolved to the real one).  SIGTERM
or SIGINT drains: the shard refuses new work with ``draining`` so the Executor
moves its sequences away and frees them; once it holds none (or after
``--drain-timeout``, or at a second signal) it closes the socket, frees the pool
and exits 0; a further signal while the request under way still runs (a Configure calibrating a large pool)
exits 1 without waiting for it.  With ``--curve-dir`` the link is CURVE-encrypted and only listed
client keys get in; without keys it binds only to loopback unless
``--insecure-bind-any``.  The model's KV shape arrives later from the Executor
(Configure).  Imports no torch.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys

import click

from fastdecode.cli.errors import OneLineCommand, OneLineError
from fastdecode.cli.log_options import LOG_LEVEL_OPTION, configure_logging
from fastdecode.cli.sizes import SIZE, format_size
from fastdecode.native import ISA_NAMES
from fastdecode.transport.sockets import check_address

log = logging.getLogger("fastdecode.start_shard")
HURRIED_STOP_S = 2.0  # after a further signal, how long the stop may still wait for the request under way


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> (0, 1, 2, 3, 8, 10, 11); ValueError for anything else."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"cannot read {part!r} in cpu list {text!r}: use e.g. 0-7,16-23")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"range {part!r} in cpu list {text!r} goes backwards")
        cpus.extend(range(first, last + 1))
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"cpu list {text!r} names a CPU twice")
    return tuple(cpus)


def check_listen_address(listen: str) -> None:
    """ValueError unless ZeroMQ binds ``listen`` as given (``check_address``: any free port allowed)."""
    check_address(listen)


def shard_addresses_option(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Checks each ``--shard ADDR`` of a command that connects to shard daemons when the options are read (as
    ClusterConfig does later): an address a daemon listens on, with its own port."""
    for address in value:
        try:
            check_address(address, listener="the shard daemon")
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return value


def _listen_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        check_listen_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


def _cpu_list_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return parse_cpu_list(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


async def _serve(listen: str, config, *, curve_dir: str | None, drain_timeout_s: float) -> None:  # noqa: ANN001
    from fastdecode.actors.loop import stop_signals

    stop, hurry = asyncio.Event(), asyncio.Event()
    with stop_signals(stop, hurry):
        await _serve_until_stopped(listen, config, curve_dir, drain_timeout_s, stop, hurry)


async def _serve_until_stopped(listen: str, config, curve_dir: str | None, drain_timeout_s: float,  # noqa: ANN001
                               stop: asyncio.Event, hurry: asyncio.Event) -> None:
    from fastdecode.actors.kvshard import KVShard
    from fastdecode.actors.shard_drain import DrainableShard, drain, drainable_server
    from fastdecode.transport.security import ServerKeys, server_context

    security = server_context(ServerKeys.load(curve_dir)) if curve_dir else None
    actor = DrainableShard(KVShard(config))
    server = drainable_server(actor, listen, ctx=security.ctx if security else None)
    try:
        address = await server.start()
        print(f"ready {address}", file=sys.stderr, flush=True)
        await stop.wait()
        log.info("draining: %d sequence(s) to move away (deadline %.0f s)", actor.num_sequences, drain_timeout_s)
        num_left = await drain(actor, timeout_s=drain_timeout_s, hurry=hurry)
        if num_left:
            log.warning("stopping with %d sequence(s) not moved away", num_left)
    finally:
        if not await stop_unless_hurried(server, hurry):
            log.warning("stopping at once, without waiting for the request under way")
            os._exit(1)  # the worker thread is in the native library; nothing else holds state worth saving
        if security is not None:
            security.close()
    log.info("shard on %s stopped", listen)


async def stop_unless_hurried(server, hurry: asyncio.Event, *, grace_s: float = HURRIED_STOP_S) -> bool:  # noqa: ANN001
    """``server.stop()``, which waits for the request being handled: a Configure pre-faults and calibrates the
    pool, for a minute on a large one. Once ``hurry`` is set (a further signal, now or before) it waits ``grace_s``
    more at most; False when the stop did not end by then."""
    stopping = asyncio.ensure_future(server.stop())
    if not hurry.is_set():
        hurried = asyncio.ensure_future(hurry.wait())
        try:
            await asyncio.wait({stopping, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
    done, _ = await asyncio.wait({stopping}, timeout=grace_s)
    if done:
        stopping.result()  # its error, if it failed
    return bool(done)


@click.command("start-shard", cls=OneLineCommand)
@click.option("--listen", required=True, callback=_listen_option,
              help="Address to bind: tcp://HOST:PORT (PORT 0 or *: any free one) or ipc://PATH.")
@click.option("--kv-memory", required=True, type=SIZE, help="KV pool size, e.g. 256MiB or 16GiB.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Attention threads (default: every CPU this process may use).")
@click.option("--page-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Tokens per KV page.")
@click.option("--cpu-list", default=None, callback=_cpu_list_option, help="Pin the threads to these CPUs: 0-7,16-23.")
@click.option("--isa", type=click.Choice(ISA_NAMES), default=None,
              help="Attention kernel (default: the best this CPU has).")
@click.option("--no-calibrate", is_flag=True, help="Skip the short attention benchmark at configure time.")
@click.option("--slowdown-s-per-gb", type=click.FloatRange(0.0, 1e3), default=0.0, show_default=True,
              help="Testing: sleep this many seconds per GB of KV each attend reads (a slower shard).")
@click.option("--curve-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="CURVE key folder (fdctl keygen): encrypt the link, accept only its authorized client keys.")
@click.option("--insecure-bind-any", "is_insecure_bind_any", is_flag=True,
              help="Allow a non-loopback --listen without --curve-dir (anyone who reaches it can use it).")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(0, 86400), default=30.0,
              show_default=True, help="On SIGTERM: seconds to wait for the Executor to move the sequences away.")
@LOG_LEVEL_OPTION
def start_shard(listen: str, kv_memory: int, threads: int | None, page_size: int, cpu_list: tuple[int, ...] | None,
                isa: str | None, no_calibrate: bool, slowdown_s_per_gb: float, log_level: str, curve_dir: str | None,
                is_insecure_bind_any: bool, drain_timeout_s: float) -> None:
    """Run one KVShard (KV-cache and attention on this host's CPUs) until SIGTERM/SIGINT."""
    configure_logging(log_level)
    from fastdecode.actors.kvshard import ShardConfig
    from fastdecode.transport.event_loop import run_event_loop
    from fastdecode.transport.sockets import is_loopback_address

    try:
        config = ShardConfig(kv_memory_bytes=kv_memory, num_threads=threads, page_size=page_size, cpu_list=cpu_list,
                             isa=isa, is_calibrating=not no_calibrate, slowdown_s_per_gb=slowdown_s_per_gb)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if curve_dir is None and not is_loopback_address(listen):
        if not is_insecure_bind_any:
            raise click.UsageError(f"refusing to listen on {listen} without CURVE keys: give --curve-dir DIR "
                                   "(make keys with fdctl keygen), or --insecure-bind-any to accept that any host "
                                   "that reaches it can use this shard")
        log.warning("listening on %s without authentication or encryption (--insecure-bind-any): any host that "
                    "reaches it can use this shard", listen)
    log.info("starting KVShard on %s with %s of KV memory, %s threads", listen, format_size(kv_memory),
             threads or "all")
    try:
        run_event_loop(_serve(listen, config, curve_dir=curve_dir, drain_timeout_s=drain_timeout_s))
    except (OSError, ValueError) as exc:  # a busy port or an address it cannot bind, unusable keys
        raise OneLineError(str(exc)) from None
