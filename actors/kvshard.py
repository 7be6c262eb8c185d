"""The KVShard actor: a KV pool in host memory and attention over it, behind on_<message> handlers.

Plain logic (no sockets): the actor runtime serves it, on one worker thread, so
no handler here ever runs concurrently with another.  The pool is created by the
first ``Configure`` (a daemon starts knowing only its memory and threads).  Every
failure of one request (unknown sequence, wrong shapes, pool full, not yet
configured) raises ``ActorError`` and leaves the shard serving.

Speed figures for the scheduler's performance model ``T = a + bytes / bandwidth``:
a short calibration at configure time fits ``a`` (``attend_overhead_s``) and the
bandwidth (``calibrated_gbps``) from attends over two context lengths;
``attn_gbps`` is then a moving figure over real attend calls (bytes of KV read /
seconds inside the native call).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np

from fastdecode.actors.host_memory import available_memory_bytes
from fastdecode.actors.runtime import ActorError
from fastdecode.native.lib import (
    DEFAULT_CHUNK_TOKENS,
    HEAD_DIM_MULTIPLE,
    ISA_NAMES,
    MAX_GROUP,
    MAX_HEAD_DIM,
    KVPool,
    NativeError,
    Status,
    available_isas,
)
from fastdecode.transport.shard_messages import (
    Allocate,
    AppendPrompt,
    Attend,
    AttendResult,
    Configure,
    Free,
    GetStats,
    ShardStats,
)

log = logging.getLogger(__name__)

# ErrorReply codes a shard answers with (besides the runtime's protocol/unsupported/internal)
NOT_CONFIGURED = "not_configured"
BUSY = "busy"
BAD_REQUEST = "bad_request"
UNKNOWN_SEQUENCE = "unknown_sequence"
ALREADY_EXISTS = "already_exists"
POOL_FULL = "pool_full"
OUT_OF_MEMORY = "out_of_memory"
_NATIVE_CODES = {Status.INVALID_ARGUMENT: BAD_REQUEST, Status.OUT_OF_MEMORY: OUT_OF_MEMORY,
                 Status.ALREADY_EXISTS: ALREADY_EXISTS, Status.NOT_FOUND: UNKNOWN_SEQUENCE,
                 Status.POOL_FULL: POOL_FULL}

GBPS_SMOOTHING = 0.1  # weight of the newest attend call in the moving bandwidth
CALIBRATION_SEQ_ID = 1 << 62  # calibration sequences live only while the pool is otherwise empty
CALIBRATION_NUM_SEQS = 8
CALIBRATION_MAX_TOKENS = 2048
CALIBRATION_NUM_RUNS = 5
# The long attend reads at least this much KV (as far as half the pool allows): a working set the
# last-level cache holds (8 sequences x 2048 tokens is 64 MiB) measured cache bandwidth, 2-3x what the
# shard then reads from memory in a real step.
CALIBRATION_MIN_BYTES = 1 << 30


@dataclass(frozen=True)
class ShardConfig:
    """What a shard daemon is started with; the model shape comes later, by Configure.

    Validated here, at start, against what the native pool will accept at the first Configure: a value it
    could never use is refused before the daemon prints ``ready``, not when the GPU host connects.
    """

    # The native pool's limits, which only native/csrc/pool.cpp holds; test_kvshard.py checks these copies
    # against the pool's own refusals.
    PAGE_SIZE_STEP: ClassVar[int] = 16  # page_size is a multiple of it in [PAGE_SIZE_STEP, MAX_PAGE_SIZE]
    MAX_PAGE_SIZE: ClassVar[int] = 256
    MAX_NUM_THREADS: ClassVar[int] = 4096

    kv_memory_bytes: int
    num_threads: int | None = None  # None: every CPU this process may run on
    page_size: int = 32
    cpu_list: tuple[int, ...] | None = None
    isa: str | None = None  # None: the best this CPU has
    is_calibrating: bool = True
    slowdown_s_per_gb: float = 0.0  # testing: sleep this long per GB of KV each attend reads (a slower shard)
    # A client session whose last request is older than this is gone (a killed Executor): another session's
    # Configure frees its sequences; a younger one is refused ``busy``. 2 x the Executor's dead-peer window,
    # (liveness 3 + 1) x heartbeat 1 s, with ClusterConfig's defaults; an Executor holding sequences sends
    # requests every step.
    session_timeout_s: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.kv_memory_bytes, bool) or not isinstance(self.kv_memory_bytes, int) \
                or self.kv_memory_bytes < 1 << 20:
            raise ValueError(f"kv_memory_bytes must be at least 1 MiB, got {self.kv_memory_bytes!r}")
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if self.kv_memory_bytes > physical:
            raise ValueError(f"kv_memory_bytes {self.kv_memory_bytes} is more than this host's physical memory "
                             f"({physical} bytes, {physical / (1 << 30):.1f} GiB)")
        threads = self.num_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or not 1 <= threads <= self.MAX_NUM_THREADS):
            raise ValueError(f"num_threads must be an integer in [1, {self.MAX_NUM_THREADS}], got {threads!r}")
        step, largest = self.PAGE_SIZE_STEP, self.MAX_PAGE_SIZE
        usable = [size for size in range(step, largest + 1, step) if DEFAULT_CHUNK_TOKENS % size == 0]
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size not in usable:
            raise ValueError(f"page_size must be a multiple of {step} in [{step}, {largest}] that divides the "
                             f"{DEFAULT_CHUNK_TOKENS}-token attention chunk ({', '.join(map(str, usable))}), "
                             f"got {self.page_size!r}")
        if self.cpu_list is not None:
            allowed = os.sched_getaffinity(0)
            if not self.cpu_list or any(isinstance(c, bool) or not isinstance(c, int) for c in self.cpu_list):
                raise ValueError(f"cpu_list must list CPU numbers, got {self.cpu_list!r}")
            outside = sorted(set(self.cpu_list) - allowed)
            if outside:
                raise ValueError(f"cpu_list names CPU(s) {outside} that this process may not run on (it may use "
                                 f"{self._cpu_ranges(allowed)})")
        if self.isa is not None:
            if self.isa not in ISA_NAMES:
                raise ValueError(f"isa must be one of {', '.join(ISA_NAMES)}, got {self.isa!r}")
            if self.isa not in available_isas():
                raise ValueError(f"isa {self.isa!r} is not available on this CPU (available: "
                                 f"{', '.join(available_isas())})")
        if not 0.0 <= self.slowdown_s_per_gb <= 1e3:
            raise ValueError(f"slowdown_s_per_gb must be in [0, 1000], got {self.slowdown_s_per_gb!r}")
        if not 0.0 <= self.session_timeout_s <= 86400:
            raise ValueError(f"session_timeout_s must be in [0, 86400], got {self.session_timeout_s!r}")

    @staticmethod
    def _cpu_ranges(cpus: set[int]) -> str:
        """``{0, 1, 2, 5}`` -> ``"0-2,5"`` (the form --cpu-list takes)."""
        ranges: list[list[int]] = []
        for cpu in sorted(cpus):
            if ranges and cpu == ranges[-1][1] + 1:
                ranges[-1][1] = cpu
            else:
                ranges.append([cpu, cpu])
        return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


@contextlib.contextmanager
def _as_actor_errors() -> Iterator[None]:
    """Native failures and argument errors of one request become ActorError for that request."""
    try:
        yield
    except NativeError as exc:
        raise ActorError(_NATIVE_CODES.get(exc.status, "native_error"), str(exc)) from None
    except ValueError as exc:
        raise ActorError(BAD_REQUEST, str(exc)) from None


def _aligned(array: np.ndarray) -> np.ndarray:
    """The array itself when C-contiguous and aligned (a received frame usually is), else an aligned copy."""
    return np.require(array, requirements=("C", "A"))


class KVShard:
    """Owns one KVPool; handlers run on the actor's worker thread."""

    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self._pool: KVPool | None = None
        self._shape: Configure | None = None
        self._lengths: dict[int, list[int]] = {}  # seq_id -> tokens per layer (for bytes read)
        self._session_id = 0  # the client session whose sequences the pool holds (Configure)
        self._calibrated_gbps = 0.0
        self._attend_overhead_s = 0.0
        self._ewma_bytes = 0.0
        self._ewma_seconds = 0.0
        self._num_attend_calls = 0

    @property
    def num_sequences(self) -> int:
        """Sequences the pool holds now (a read of one dict's length: safe from another thread)."""
        return len(self._lengths)

    # ------------------------------------------------------------ configure
    @property
    def session_id(self) -> int:
        """The client session the shard serves (its last Configure's; 0: none yet)."""
        return self._session_id

    def on_configure(self, message: Configure, *, holder_idle_s: float | None = None,
                     holder_ping_s: float | None = None) -> ShardStats:
        """Where the caller tracks them (a daemon's DrainableShard), ``holder_idle_s`` is the seconds since the
        last request of the session the shard serves, ``holder_ping_s`` since its last heartbeat (None: not
        known). Another session is refused while that one is live: its heartbeats still come (an idle Executor
        sends nothing else), or, where none was heard, it holds sequences and sent a request within
        ``session_timeout_s``. Without either figure another session takes the shard at once."""
        timeout_s = self.config.session_timeout_s
        is_holder_live = bool(self._session_id) and holder_ping_s is not None and holder_ping_s < timeout_s
        is_reshape = self._shape is None or self._shape.shape != message.shape
        if not message.session_id and is_holder_live and is_reshape:
            raise ActorError(BUSY, f"an Executor (client session) uses this shard: its last heartbeat came "
                                   f"{holder_ping_s:.1f} s ago; a client that names no session may not configure "
                                   f"it for {self._describe(message)}")
        if message.session_id and message.session_id != self._session_id:
            if is_holder_live:
                raise ActorError(BUSY, f"another Executor (client session) uses this shard: its last heartbeat "
                                       f"came {holder_ping_s:.1f} s ago. A shard serves one Executor at a time: "
                                       "stop the other one, or give this one other shards (retry once it has "
                                       f"been silent for {timeout_s:g} s)")
            if self._lengths and holder_idle_s is not None and holder_idle_s < timeout_s:
                raise ActorError(BUSY, f"another Executor (client session) holds {len(self._lengths)} sequence(s) "
                                       f"on this shard and sent a request {holder_idle_s:.1f} s ago; a shard serves "
                                       "one Executor at a time: stop the other one, or give this one other shards "
                                       f"(if it was killed, retry once it has been silent for "
                                       f"{timeout_s:g} s: its sequences are then freed)")
            if self._lengths:
                log.warning("a new client session: freeing %d sequence(s) the previous one left",
                            len(self._lengths))
                self.on_free(Free(tuple(self._lengths)))
            self._session_id = message.session_id
        if not is_reshape:
            return self.on_get_stats(GetStats())
        if self._pool is not None:
            if self._lengths:
                raise ActorError(BUSY, f"the pool holds {len(self._lengths)} sequences configured for "
                                       f"{self._describe(self._shape)}; free them before configuring "
                                       f"{self._describe(message)}")
            self._pool.close()
            self._pool, self._shape = None, None
        available = available_memory_bytes()
        if self.config.kv_memory_bytes > available:  # the pool pre-faults it all: more gets the process OOM-killed
            raise ActorError(OUT_OF_MEMORY, f"this shard's KV memory of {_in_gib(self.config.kv_memory_bytes)} is more "
                                            f"than this host can give now ({_in_gib(available)} available): start it "
                                            "with a smaller --kv-memory")
        with _as_actor_errors():
            self._pool = KVPool(
                num_layers=message.num_layers, num_kv_heads=message.num_kv_heads, head_dim=message.head_dim,
                kv_dtype=message.kv_dtype, capacity_bytes=self.config.kv_memory_bytes,
                page_size=self.config.page_size, num_threads=self.config.num_threads,
                cpu_list=list(self.config.cpu_list) if self.config.cpu_list else None, isa=self.config.isa,
            )
        self._shape = message
        self._ewma_bytes = self._ewma_seconds = 0.0
        self._num_attend_calls = 0
        if self.config.is_calibrating:
            self._calibrate()
        log.info("configured for %s: %d pages of %d tokens, %s, %d threads, %.1f GB/s calibrated",
                 self._describe(message), self._pool.num_total_pages, self._pool.page_size, self._pool.isa,
                 self._pool.num_threads, self._calibrated_gbps)
        return self.on_get_stats(GetStats())

    @staticmethod
    def _describe(shape: Configure | None) -> str:
        if shape is None:
            return "nothing"
        return f"{shape.num_layers} layers x {shape.num_kv_heads} kv heads x {shape.head_dim} ({shape.kv_dtype})"

    def _calibrate(self) -> None:
        """Time attends over two context lengths on layer 0; fit overhead and bandwidth. Leaves the pool empty."""
        pool = self._require_pool()
        shape = self._shape
        assert shape is not None
        pages_long = -(-(CALIBRATION_MAX_TOKENS + CALIBRATION_NUM_RUNS * 2 + 1) // pool.page_size)
        wanted = -(-CALIBRATION_MIN_BYTES // (CALIBRATION_MAX_TOKENS * pool.bytes_per_token))
        num_seqs = max(CALIBRATION_NUM_SEQS, min(wanted, pool.num_free_pages // (2 * pages_long)))
        pages_per_seq = pool.num_free_pages // (num_seqs * 2)  # layer 0 only; half the pool at most
        long_tokens = min(CALIBRATION_MAX_TOKENS, pages_per_seq * pool.page_size - CALIBRATION_NUM_RUNS * 2 - 1)
        if long_tokens < 2 * pool.page_size:
            log.warning("pool too small to calibrate; attention bandwidth unknown until the first attends")
            return
        dtype = np.dtype(shape.kv_dtype)
        seq_ids = np.arange(CALIBRATION_SEQ_ID, CALIBRATION_SEQ_ID + num_seqs, dtype=np.int64)
        q = np.zeros((num_seqs, shape.num_kv_heads, shape.head_dim), dtype)
        kv = np.zeros((num_seqs, shape.num_kv_heads, shape.head_dim), dtype)
        bytes_per_token = pool.bytes_per_token
        points = []
        try:
            for seq_id in seq_ids:
                pool.allocate(int(seq_id))
            for target in (1, long_tokens):
                filler = np.zeros((target - 1, shape.num_kv_heads, shape.head_dim), dtype)
                for seq_id in seq_ids:
                    if len(filler):
                        pool.append(int(seq_id), 0, filler, filler)
                times = []
                for run in range(CALIBRATION_NUM_RUNS):
                    start = time.perf_counter()
                    pool.attend(0, seq_ids, q, kv, kv)
                    self._slow_down(num_seqs * pool.seq_len(int(seq_ids[0]), 0) * bytes_per_token)
                    times.append(time.perf_counter() - start)
                context = pool.seq_len(int(seq_ids[0]), 0) - CALIBRATION_NUM_RUNS // 2
                points.append((num_seqs * context * bytes_per_token, float(np.median(times))))
                for seq_id in seq_ids:  # start the next length from empty sequences
                    pool.free(int(seq_id))
                    pool.allocate(int(seq_id))
        finally:
            for seq_id in seq_ids:
                with contextlib.suppress(NativeError):
                    pool.free(int(seq_id))
        (bytes_short, t_short), (bytes_long, t_long) = points
        if t_long > t_short:
            self._calibrated_gbps = (bytes_long - bytes_short) / (t_long - t_short) / 1e9
            self._attend_overhead_s = max(0.0, t_short - bytes_short / (self._calibrated_gbps * 1e9))
        else:  # too fast to tell apart: all of it is bandwidth
            self._calibrated_gbps = bytes_long / t_long / 1e9
            self._attend_overhead_s = 0.0

    # ------------------------------------------------------------ sequences
    def _require_pool(self) -> KVPool:
        if self._pool is None:
            raise ActorError(NOT_CONFIGURED, "send Configure (the model's KV shape) first")
        return self._pool

    def on_allocate(self, message: Allocate) -> None:
        """All or nothing: on any failure the sequences this message allocated are freed again."""
        pool = self._require_pool()
        num_layers = self._shape.num_layers if self._shape else 0
        done: list[int] = []
        try:
            with _as_actor_errors():
                for seq_id in message.seq_ids:
                    pool.allocate(seq_id)
                    done.append(seq_id)
        except ActorError:
            for seq_id in done:
                pool.free(seq_id)
            raise
        for seq_id in done:
            self._lengths[seq_id] = [0] * num_layers

    def on_free(self, message: Free) -> None:
        """All or nothing: when one of the sequences is unknown, none is freed (``unknown_sequence``)."""
        pool = self._require_pool()
        unknown = [seq_id for seq_id in message.seq_ids if seq_id not in self._lengths]
        if unknown:
            raise ActorError(UNKNOWN_SEQUENCE, f"no such sequence(s): {unknown[:16]}"
                                               f"{' ...' if len(unknown) > 16 else ''}; nothing was freed")
        for seq_id in message.seq_ids:
            del self._lengths[seq_id]
            with _as_actor_errors():
                pool.free(seq_id)

    def on_append_prompt(self, message: AppendPrompt) -> None:
        pool = self._require_pool()
        lengths = self._lengths.get(message.seq_id)
        if lengths is None:
            raise ActorError(UNKNOWN_SEQUENCE, f"no such sequence: {message.seq_id}")
        with _as_actor_errors():
            pool.append(message.seq_id, None, _aligned(message.k), _aligned(message.v))
        num_tokens = message.k.shape[1]
        for layer in range(len(lengths)):
            lengths[layer] += num_tokens

    # ------------------------------------------------------------ attention
    def on_attend(self, message: Attend) -> AttendResult:
        pool = self._require_pool()
        layer = message.layer
        if self._shape is None or layer >= self._shape.num_layers:
            raise ActorError(BAD_REQUEST, f"layer {layer} out of range for {self._describe(self._shape)}")
        seq_ids = message.seq_ids
        lse = np.empty(message.q.shape[:2], np.float32) if message.want_lse else None
        with _as_actor_errors():
            start = time.perf_counter()
            o = pool.attend(layer, seq_ids, _aligned(message.q), _aligned(message.k), _aligned(message.v), lse=lse)
        num_tokens_read = 0
        for seq_id in seq_ids.tolist():
            lengths = self._lengths[seq_id]
            lengths[layer] += 1
            num_tokens_read += lengths[layer]
        self._slow_down(num_tokens_read * pool.bytes_per_token)
        self._record_attend(num_tokens_read * pool.bytes_per_token, time.perf_counter() - start)
        return AttendResult(o, lse)

    def _slow_down(self, num_bytes: int) -> None:
        """With ``slowdown_s_per_gb`` (tests of uneven shards): wait in proportion to the bytes read."""
        if self.config.slowdown_s_per_gb > 0:
            time.sleep(self.config.slowdown_s_per_gb * num_bytes / 1e9)

    def _record_attend(self, num_bytes: int, seconds: float) -> None:
        weight = 1.0 if self._num_attend_calls == 0 else GBPS_SMOOTHING
        self._ewma_bytes += weight * (num_bytes - self._ewma_bytes)
        self._ewma_seconds += weight * (seconds - self._ewma_seconds)
        self._num_attend_calls += 1

    # ------------------------------------------------------------ stats
    def on_get_stats(self, message: GetStats) -> ShardStats:
        pool, shape = self._pool, self._shape
        measured = self._ewma_bytes / self._ewma_seconds / 1e9 if self._ewma_seconds > 0 else self._calibrated_gbps
        common = dict(attn_gbps=measured, calibrated_gbps=self._calibrated_gbps,
                      attend_overhead_s=self._attend_overhead_s, num_attend_calls=self._num_attend_calls)
        if pool is None or shape is None:
            return ShardStats(capacity_bytes=self.config.kv_memory_bytes, used_bytes=0, num_sequences=0,
                              num_free_pages=0, num_total_pages=0, page_size=self.config.page_size,
                              bytes_per_token=0, num_threads=self.config.num_threads or 0,
                              isa=self.config.isa or "", **common)
        return ShardStats(
            capacity_bytes=pool.capacity_bytes, used_bytes=pool.used_bytes, num_sequences=len(self._lengths),
            num_free_pages=pool.num_free_pages, num_total_pages=pool.num_total_pages, page_size=pool.page_size,
            bytes_per_token=pool.bytes_per_token, num_threads=pool.num_threads, isa=pool.isa,
            num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
            kv_dtype=shape.kv_dtype, **common,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._lengths.clear()


def shape_problem(num_heads: int, num_kv_heads: int, head_dim: int) -> str | None:
    """Why a model's attention shape is one a shard cannot serve (a Configure would pass, then every attend fail), or
    None: a GQA group past the kernels' ``MAX_GROUP`` query heads per KV head, or a head dim they do not take."""
    group = num_heads // num_kv_heads
    if group > MAX_GROUP:
        return (f"{num_heads} query heads per {num_kv_heads} KV heads ({group} to a group); the shards' attention "
                f"takes at most {MAX_GROUP}")
    if not (HEAD_DIM_MULTIPLE <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0):
        return (f"a head dim of {head_dim}; the shards' attention takes a multiple of {HEAD_DIM_MULTIPLE} up to "
                f"{MAX_HEAD_DIM}")
    return None


def _in_gib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 30):.1f} GiB"
