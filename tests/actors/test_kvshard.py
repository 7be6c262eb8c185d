"""The KVShard: its logic without sockets, then through the embedded runtime, then a fuzzed live socket."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import ml_dtypes
import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdecode.actors.kvshard import KVShard, ShardConfig
from fastdecode.actors.runtime import ActorError, ActorServer
from fastdecode.actors.shard_client import ShardClient, start_embedded_shard
from fastdecode.native.lib import KVPool
from fastdecode.transport.codec import Codec
from fastdecode.transport.control_messages import ErrorReply
from fastdecode.transport.errors import RemoteRequestError
from fastdecode.transport.shard_messages import (
    SHARD_CHANNEL,
    Allocate,
    AppendPrompt,
    Attend,
    AttendResult,
    Configure,
    Free,
    GetStats,
    ShardStats,
)

pytestmark = pytest.mark.timeout(60)

BF16 = np.dtype(ml_dtypes.bfloat16)
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, NUM_Q_HEADS = 2, 2, 64, 8
SHAPE = Configure(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype="bfloat16")
MEMORY = 16 << 20


def _rand(rng, shape, dtype=BF16) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _reference_pool() -> KVPool:
    return KVPool(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype="bfloat16",
                  capacity_bytes=MEMORY, page_size=32, num_threads=1)


@pytest.fixture
def shard():
    actor = KVShard(ShardConfig(kv_memory_bytes=MEMORY, num_threads=1))
    yield actor
    actor.close()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ShardConfig(kv_memory_bytes=10)
    with pytest.raises(ValueError):
        ShardConfig(kv_memory_bytes=MEMORY, isa="sse9")
    with pytest.raises(ValueError):
        ShardConfig(kv_memory_bytes=MEMORY, num_threads=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=8), "multiple of 16 in"),
    (dict(page_size=48), "divides the 512-token"),   # a pool page, but not a divisor of the attention chunk
    (dict(page_size=512), r"in \[16, 256\]"),
    (dict(num_threads=4097), r"\[1, 4096\]"),
    (dict(cpu_list=(0, 4095)), r"CPU\(s\) \[4095\] that this process may not run on"),
    (dict(kv_memory_bytes=1 << 62), "physical memory"),
])
def test_config_refuses_what_the_pool_would_refuse_at_configure(kwargs, message) -> None:
    """A daemon must not print ``ready`` with values the first Configure from the GPU host then fails on."""
    with pytest.raises(ValueError, match=message):
        ShardConfig(**{"kv_memory_bytes": MEMORY, **kwargs})


def test_config_refuses_an_isa_this_cpu_lacks() -> None:
    from fastdecode.native.lib import ISA_NAMES, available_isas

    missing = [isa for isa in ISA_NAMES if isa not in available_isas()]
    if not missing:
        pytest.skip("this CPU has every ISA path")
    with pytest.raises(ValueError, match=f"isa {missing[0]!r} is not available on this CPU"):
        ShardConfig(kv_memory_bytes=MEMORY, isa=missing[0])
    assert ShardConfig(kv_memory_bytes=MEMORY, isa=available_isas()[0]).isa == available_isas()[0]


def test_config_limits_agree_with_the_native_pool() -> None:
    """ShardConfig keeps a copy of pool.cpp's limits: every page size it accepts the pool accepts, and the pool's
    own refusals name the same bounds."""
    import re

    from fastdecode.native.lib import DEFAULT_CHUNK_TOKENS, NativeError

    def pool_takes(page_size: int, **kwargs) -> bool:
        try:
            KVPool(num_layers=1, num_kv_heads=1, head_dim=16, kv_dtype="float32", capacity_bytes=1 << 20,
                   page_size=page_size, chunk_tokens=page_size, num_threads=1, **kwargs).close()
        except NativeError as exc:
            pool_takes.last_error = str(exc)
            return False
        return True

    for page_size in range(1, 2 * ShardConfig.MAX_PAGE_SIZE + 1):
        is_pool_page = pool_takes(page_size)
        try:
            ShardConfig(kv_memory_bytes=MEMORY, page_size=page_size)
            assert is_pool_page and DEFAULT_CHUNK_TOKENS % page_size == 0, page_size
        except ValueError:
            assert not is_pool_page or DEFAULT_CHUNK_TOKENS % page_size, page_size
    assert not pool_takes(ShardConfig.MAX_PAGE_SIZE + ShardConfig.PAGE_SIZE_STEP)
    step, low, high = map(int, re.search(r"multiple of (\d+) in \[(\d+), (\d+)\]", pool_takes.last_error).groups())
    assert (step, low, high) == (ShardConfig.PAGE_SIZE_STEP, ShardConfig.PAGE_SIZE_STEP, ShardConfig.MAX_PAGE_SIZE)
    with pytest.raises(NativeError, match=rf"num_threads must be in \[1, {ShardConfig.MAX_NUM_THREADS}\]"):
        KVPool(num_layers=1, num_kv_heads=1, head_dim=16, kv_dtype="float32", capacity_bytes=1 << 20,
               page_size=16, num_threads=ShardConfig.MAX_NUM_THREADS + 1)


def test_requests_before_configure_are_refused(shard) -> None:
    with pytest.raises(ActorError) as info:
        shard.on_allocate(Allocate((1,)))
    assert info.value.code == "not_configured"
    stats = shard.on_get_stats(GetStats())
    assert not stats.is_configured and stats.capacity_bytes == MEMORY


def test_a_new_client_session_frees_what_the_previous_one_left(shard) -> None:
    """An Executor killed without freeing its sequences: the next one's Configure frees them, while a
    reconnect of the same session (or a client with no session) keeps them."""
    rng = np.random.default_rng(5)
    first = Configure(**{**SHAPE.__dict__, "session_id": 7})
    shard.on_configure(first)
    shard.on_allocate(Allocate((1, 2)))
    k = _rand(rng, (NUM_LAYERS, 9, NUM_KV_HEADS, HEAD_DIM))
    shard.on_append_prompt(AppendPrompt(1, k, k))
    assert shard.on_configure(first).num_sequences == 2  # the same session again: a no-op
    assert shard.on_configure(SHAPE).num_sequences == 2  # no session named: nothing freed
    stats = shard.on_configure(Configure(**{**SHAPE.__dict__, "session_id": 8}))
    assert stats.num_sequences == 0 and stats.used_bytes == 0
    shard.on_allocate(Allocate((1, 2)))  # the ids are free again, and hold nothing
    stats = shard.on_get_stats(GetStats())
    assert stats.num_sequences == 2 and stats.used_bytes == 0


def test_a_draining_shard_counts_what_it_holds_after_a_new_session(shard) -> None:
    """The daemon's drain waits for the sequences the shard holds: those a new session's Configure freed
    are not among them (the drain used to wait its idle timeout out for them)."""
    from fastdecode.actors.shard_drain import DrainableShard

    drainable = DrainableShard(shard)
    drainable.on_configure(Configure(**{**SHAPE.__dict__, "session_id": 7}))
    drainable.on_allocate(Allocate((1, 2, 3)))
    drainable.on_free(Free((3,)))
    assert drainable.num_sequences == 2
    drainable.last_request_s -= shard.config.session_timeout_s  # the first Executor was killed a while ago
    drainable.on_configure(Configure(**{**SHAPE.__dict__, "session_id": 8}))  # an Executor restarted
    assert drainable.num_sequences == 0


def test_calibration_reads_a_working_set_past_the_cache(monkeypatch) -> None:
    """The long calibration attend covers CALIBRATION_MIN_BYTES of KV (here 4 MiB, a quarter of the pool),
    not a fixed 8 sequences that a last-level cache would hold."""
    import fastdecode.actors.kvshard as kvshard

    monkeypatch.setattr(kvshard, "CALIBRATION_MIN_BYTES", 4 << 20)
    monkeypatch.setattr(kvshard, "CALIBRATION_MAX_TOKENS", 512)
    read: list[int] = []
    real_attend = KVPool.attend

    def spy(pool, layer, seq_ids, q, k, v, *args, **kwargs):
        read.append(sum(pool.seq_len(int(s), layer) for s in seq_ids) * pool.bytes_per_token)
        return real_attend(pool, layer, seq_ids, q, k, v, *args, **kwargs)

    monkeypatch.setattr(KVPool, "attend", spy)
    actor = KVShard(ShardConfig(kv_memory_bytes=MEMORY, num_threads=1))
    try:
        stats = actor.on_configure(SHAPE)
    finally:
        actor.close()
    assert stats.calibrated_gbps > 0
    assert max(read) >= 4 << 20


def test_attend_matches_the_pool_bitwise_and_stats_move(shard) -> None:
    rng = np.random.default_rng(1)
    stats = shard.on_configure(SHAPE)
    assert stats.is_configured and stats.num_layers == NUM_LAYERS and stats.kv_dtype == "bfloat16"
    assert stats.calibrated_gbps > 0 and stats.used_bytes == 0 and stats.num_sequences == 0
    reference = _reference_pool()
    seq_ids = [3, 11]
    shard.on_allocate(Allocate(tuple(seq_ids)))
    for seq_id, length in zip(seq_ids, (5, 40)):
        reference.allocate(seq_id)
        k, v = _rand(rng, (NUM_LAYERS, length, NUM_KV_HEADS, HEAD_DIM)), _rand(rng, (NUM_LAYERS, length, NUM_KV_HEADS, HEAD_DIM))
        shard.on_append_prompt(AppendPrompt(seq_id, k, v))
        reference.append(seq_id, None, k, v)
    for step in range(3):
        for layer in range(NUM_LAYERS):
            ids = np.array(seq_ids, np.int64)
            q = _rand(rng, (2, NUM_Q_HEADS, HEAD_DIM))
            k, v = _rand(rng, (2, NUM_KV_HEADS, HEAD_DIM)), _rand(rng, (2, NUM_KV_HEADS, HEAD_DIM))
            result = shard.on_attend(Attend(layer, ids, q, k, v, want_lse=True))
            lse = np.empty((2, NUM_Q_HEADS), np.float32)
            expected = reference.attend(layer, ids, q, k, v, lse=lse)
            assert result.o.dtype == BF16
            assert np.array_equal(result.o.view(np.uint16), expected.view(np.uint16))
            assert np.array_equal(result.lse, lse)
    stats = shard.on_get_stats(GetStats())
    assert stats.num_attend_calls == 6 and stats.attn_gbps > 0
    assert stats.num_sequences == 2 and stats.used_bytes == reference.used_bytes
    shard.on_free(Free(tuple(seq_ids)))
    assert shard.on_get_stats(GetStats()).used_bytes == 0
    reference.close()


def test_bad_requests_get_errors_and_change_nothing(shard) -> None:
    rng = np.random.default_rng(2)
    shard.on_configure(SHAPE)
    shard.on_allocate(Allocate((1,)))
    with pytest.raises(ActorError) as info:
        shard.on_allocate(Allocate((2, 1)))  # 1 exists: all or nothing, 2 is freed again
    assert info.value.code == "already_exists"
    assert shard.on_get_stats(GetStats()).num_sequences == 1
    q, kv = _rand(rng, (1, NUM_Q_HEADS, HEAD_DIM)), _rand(rng, (1, NUM_KV_HEADS, HEAD_DIM))
    cases = {
        "unknown_sequence": Attend(0, np.array([9], np.int64), q, kv, kv),
        "bad_request": Attend(NUM_LAYERS, np.array([1], np.int64), q, kv, kv),
    }
    for code, message in cases.items():
        with pytest.raises(ActorError) as info:
            shard.on_attend(message)
        assert info.value.code == code
    wrong_heads = _rand(rng, (1, 1, HEAD_DIM))
    with pytest.raises(ActorError) as info:
        shard.on_attend(Attend(0, np.array([1], np.int64), _rand(rng, (1, 2, HEAD_DIM)), wrong_heads, wrong_heads))
    assert info.value.code == "bad_request"
    with pytest.raises(ActorError) as info:
        shard.on_append_prompt(AppendPrompt(1, _rand(rng, (1, 4, NUM_KV_HEADS, HEAD_DIM)),
                                            _rand(rng, (1, 4, NUM_KV_HEADS, HEAD_DIM))))  # one layer, not two
    assert info.value.code == "bad_request"
    with pytest.raises(ActorError) as info:
        shard.on_free(Free((1, 77)))
    assert info.value.code == "unknown_sequence"
    assert shard.on_get_stats(GetStats()).num_sequences == 1  # all or nothing: 1 is still there
    shard.on_free(Free((1,)))


def test_pool_full_is_an_error_for_that_request(shard) -> None:
    shard.on_configure(SHAPE)
    stats = shard.on_get_stats(GetStats())
    tokens = stats.num_total_pages * stats.page_size // NUM_LAYERS  # more than fits with page rounding
    shard.on_allocate(Allocate((1, 2)))
    k = np.zeros((NUM_LAYERS, tokens, NUM_KV_HEADS, HEAD_DIM), BF16)
    shard.on_append_prompt(AppendPrompt(1, k, k))
    with pytest.raises(ActorError) as info:
        shard.on_append_prompt(AppendPrompt(2, k, k))
    assert info.value.code == "pool_full"
    shard.on_free(Free((1,)))
    shard.on_append_prompt(AppendPrompt(2, k, k))  # fits now


def test_reconfigure_only_when_empty(shard) -> None:
    shard.on_configure(SHAPE)
    assert shard.on_configure(SHAPE).num_layers == NUM_LAYERS  # same shape: no-op
    shard.on_allocate(Allocate((1,)))
    other = Configure(num_layers=4, num_kv_heads=1, head_dim=32, kv_dtype="float32")
    with pytest.raises(ActorError) as info:
        shard.on_configure(other)
    assert info.value.code == "busy"
    shard.on_free(Free((1,)))
    stats = shard.on_configure(other)
    assert stats.num_layers == 4 and stats.kv_dtype == "float32"


@pytest.mark.parametrize("is_threaded", [True, False], ids=["own-loop-thread", "caller-loop"])
async def test_embedded_shard_through_client_matches_pool(is_threaded: bool) -> None:
    ctx = zmq.asyncio.Context()
    rng = np.random.default_rng(3)
    threads_before = {t.name for t in threading.enumerate()}
    address, handle = await start_embedded_shard(threads=1, kv_memory_bytes=MEMORY, ctx=ctx, is_threaded=is_threaded)
    assert address.startswith("inproc://") and handle.is_threaded == is_threaded
    assert ("kvshard-loop" in {t.name for t in threading.enumerate()} - threads_before) == is_threaded
    client = await ShardClient.connect(address, ctx=ctx, heartbeat_interval_s=0.05)
    stats = await client.configure(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                                   kv_dtype="bfloat16")
    assert isinstance(stats, ShardStats) and stats.is_configured
    reference = _reference_pool()
    await client.allocate([5])
    reference.allocate(5)
    k = _rand(rng, (NUM_LAYERS, 70, NUM_KV_HEADS, HEAD_DIM))
    v = _rand(rng, (NUM_LAYERS, 70, NUM_KV_HEADS, HEAD_DIM))
    await client.append_prompt(5, k, v)
    reference.append(5, None, k, v)
    q = _rand(rng, (1, NUM_Q_HEADS, HEAD_DIM))
    k1, v1 = _rand(rng, (1, NUM_KV_HEADS, HEAD_DIM)), _rand(rng, (1, NUM_KV_HEADS, HEAD_DIM))
    o, lse = await client.attend(1, [5], q, k1, v1)
    assert lse is None
    assert np.array_equal(o.view(np.uint16), reference.attend(1, np.array([5]), q, k1, v1).view(np.uint16))
    with pytest.raises(RemoteRequestError) as info:
        await client.attend(0, [6], q, k1, v1)
    assert info.value.code == "unknown_sequence"
    assert (await client.stats()).num_sequences == 1
    pending = asyncio.ensure_future(client.attend(1, [5], q, k1, v1))
    await asyncio.sleep(0)
    await handle.stop()  # answers or finishes what is in flight, then ends the shard's thread
    with contextlib.suppress(RemoteRequestError):
        await asyncio.wait_for(pending, 5)
    assert "kvshard-loop" not in {t.name for t in threading.enumerate()} - threads_before
    await client.close()
    ctx.destroy(linger=0)
    reference.close()


class ShardInThread:
    """A KVShard served over tcp by its own event loop in a background thread (for a blocking test client)."""

    def __init__(self) -> None:
        self.address: str | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server: ActorServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        ctx = zmq.asyncio.Context()
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.server = ActorServer(KVShard(ShardConfig(kv_memory_bytes=MEMORY, num_threads=1, is_calibrating=False)),
                                  SHARD_CHANNEL, "tcp://127.0.0.1:0", ctx=ctx, max_message_bytes=1 << 20)
        self.address = await self.server.start()
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()
        ctx.destroy(linger=0)

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def live_shard():
    shard = ShardInThread()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(shard.address)
    codec = Codec(SHARD_CHANNEL)

    def call(message, request_id):
        sock.send_multipart(codec.encode(request_id, message))
        assert sock.poll(5000), "shard did not answer"
        return codec.decode(sock.recv_multipart())

    call(SHAPE, 1)
    call(Allocate((1,)), 2)
    k = np.ones((NUM_LAYERS, 3, NUM_KV_HEADS, HEAD_DIM), BF16)
    call(AppendPrompt(1, k, k), 3)
    yield shard, sock, codec, call
    sock.close(linger=0)
    ctx.term()
    shard.close()


def _valid_frames(codec) -> list[list[bytes]]:
    rng = np.random.default_rng(4)
    q, kv = _rand(rng, (1, NUM_Q_HEADS, HEAD_DIM)), _rand(rng, (1, NUM_KV_HEADS, HEAD_DIM))
    messages = [Attend(0, np.array([1], np.int64), q, kv, kv), Allocate((9,)), GetStats(),
                AppendPrompt(1, np.zeros((NUM_LAYERS, 2, NUM_KV_HEADS, HEAD_DIM), BF16),
                             np.zeros((NUM_LAYERS, 2, NUM_KV_HEADS, HEAD_DIM), BF16))]
    return [[bytes(f) for f in codec.encode(1000, m)] for m in messages]


@st.composite
def hostile_frames(draw, valid: list[list[bytes]]) -> list[bytes]:
    frames = list(draw(st.sampled_from(valid)))
    action = draw(st.sampled_from(["garbage", "truncate", "wrong_kind", "wrong_dtype", "wrong_shape",
                                   "drop_frame", "oversized"]))
    envelope = list(msgpack.unpackb(frames[0]))
    if action == "garbage":
        return draw(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=5))
    if action == "truncate":
        frames[0] = frames[0][: draw(st.integers(0, len(frames[0]) - 1))]
    elif action == "wrong_kind":
        envelope[1] = draw(st.integers(-5, 300))
    elif action in ("wrong_dtype", "wrong_shape"):
        arrays = [i for i, v in enumerate(envelope[3]) if isinstance(v, list) and len(v) == 3]
        if arrays:
            index = draw(st.sampled_from(arrays))
            desc = list(envelope[3][index])
            if action == "wrong_dtype":
                desc[0] = draw(st.sampled_from(["float64", "int8", "object", "complex64", "<f4", ""]))
            else:
                desc[1] = draw(st.lists(st.integers(0, 70), max_size=4))
            envelope[3][index] = desc
    elif action == "drop_frame" and len(frames) > 1:
        del frames[draw(st.integers(1, len(frames) - 1))]
    elif action == "oversized":
        frames.append(b"\0" * ((1 << 20) + 1 - sum(len(f) for f in frames)))  # total just over the limit
    if action in ("wrong_kind", "wrong_dtype", "wrong_shape"):
        frames[0] = msgpack.packb(envelope)
    return frames


def test_live_shard_survives_hostile_messages(live_shard) -> None:
    shard, sock, codec, call = live_shard
    rng = np.random.default_rng(5)
    q = _rand(rng, (1, NUM_Q_HEADS, HEAD_DIM))
    kv = _rand(rng, (1, NUM_KV_HEADS, HEAD_DIM))
    counts = {"error_reply": 0, "answered": 0}
    checks = iter(range(10_000, 20_000))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(hostile_frames(_valid_frames(codec)))
    def run(frames) -> None:
        sock.send_multipart(frames)
        check_id = next(checks)
        # then a valid request: every reply before its answer must be an error reply (or none at all)
        sock.send_multipart(codec.encode(check_id, GetStats()))
        while True:
            assert sock.poll(5000), "shard stopped answering"
            request_id, reply = codec.decode(sock.recv_multipart())
            if request_id == check_id:
                assert type(reply) is ShardStats and reply.num_sequences >= 1
                break
            if type(reply) is ErrorReply:
                counts["error_reply"] += 1
            else:  # a mutation that stayed a valid request (e.g. a shape that still matches) is answered
                assert request_id == 1000
                counts["answered"] += 1

    run()
    assert counts["error_reply"] > 0 and shard.server.num_dropped > 0  # both outcomes were exercised
    # afterwards a fresh sequence gets exactly the in-process pool's answer
    reference = _reference_pool()
    k = _rand(rng, (NUM_LAYERS, 7, NUM_KV_HEADS, HEAD_DIM))
    assert type(call(Allocate((500,)), 90_000)[1]).__name__ == "Ok"
    assert type(call(AppendPrompt(500, k, k), 90_001)[1]).__name__ == "Ok"
    _, result = call(Attend(1, np.array([500], np.int64), q, kv, kv), 90_002)
    reference.allocate(500)
    reference.append(500, None, k, k)
    expected = reference.attend(1, np.array([500], np.int64), q, kv, kv)
    assert type(result) is AttendResult
    assert np.array_equal(result.o.view(np.uint16), expected.view(np.uint16))
    reference.close()


def test_a_pool_larger_than_the_memory_available_now_is_refused_at_configure(monkeypatch) -> None:
    """The pool pre-faults all its memory: asked for more than the host can give now (MemAvailable, within the
    container's limit), Configure is refused with a clear error instead of the shard being OOM-killed."""
    import fastdecode.actors.kvshard as kvshard

    shard = KVShard(ShardConfig(kv_memory_bytes=8 << 20, num_threads=1, is_calibrating=False))
    monkeypatch.setattr(kvshard, "available_memory_bytes", lambda: 4 << 20)
    with pytest.raises(ActorError) as info:
        shard.on_configure(SHAPE)
    assert info.value.code == "out_of_memory" and "0.0 GiB available" in info.value.message
    monkeypatch.setattr(kvshard, "available_memory_bytes", lambda: 64 << 20)
    assert shard.on_configure(SHAPE).capacity_bytes > 0
    shard.close()


def test_what_the_shards_attention_cannot_serve_is_named() -> None:
    from fastdecode.actors.kvshard import shape_problem

    assert shape_problem(32, 8, 128) is None and shape_problem(128, 8, 128) is None  # group 16: the most
    assert "32 to a group" in shape_problem(64, 2, 128)
    assert shape_problem(32, 8, 96) is None and "head dim of 72" in shape_problem(32, 8, 72)
    assert "head dim of 512" in shape_problem(32, 8, 512)


def test_the_memory_available_is_capped_by_the_containers_limit(tmp_path) -> None:
    from fastdecode.actors.host_memory import _cgroup_room

    own = tmp_path / "cgroup"
    own.write_text("0::/pod/app\n")
    group = tmp_path / "root" / "pod" / "app"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("1073741824\n")
    (group / "memory.current").write_text("268435456\n")
    (group / "memory.stat").write_text("anon 134217728\nfile 134217728\ninactive_file 67108864\n")
    assert _cgroup_room(own, tmp_path / "root") == (768 + 64) << 20  # the inactive page cache is reclaimable
    (group / "memory.max").write_text("max\n")
    assert _cgroup_room(own, tmp_path / "root") is None
    assert _cgroup_room(tmp_path / "no-such-file", tmp_path / "root") is None
