"""Codec: round trips of every message type, the zero-copy frame layout, strict decoding, fuzzing."""
from __future__ import annotations

import dataclasses

import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdecode.transport.codec import DEFAULT_INLINE_THRESHOLD, VERSION, Codec
from fastdecode.transport.control_messages import ErrorReply, Ok, Ping, Pong
from fastdecode.transport.errors import ProtocolError
from fastdecode.transport.messages import Channel, Message, array_field
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

BF16 = np.dtype(ml_dtypes.bfloat16)
RNG = np.random.default_rng(0)


def _rand(shape, dtype) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def sample_messages() -> list:
    stats = ShardStats(
        capacity_bytes=1 << 30, used_bytes=4096, num_sequences=2, num_free_pages=10, num_total_pages=12,
        page_size=32, bytes_per_token=4096, num_threads=2, isa="avx2", attn_gbps=12.5, calibrated_gbps=11.0,
        attend_overhead_s=2e-5, num_attend_calls=7, num_layers=2, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16",
    )
    return [
        Ping(), Pong(2**64 - 1), Ok(), ErrorReply("bad_request", "no such sequence 7"),
        stats, dataclasses.replace(stats, num_layers=None, num_kv_heads=None, head_dim=None, kv_dtype=None),
        Configure(num_layers=32, num_kv_heads=8, head_dim=128, kv_dtype="bfloat16"),
        Allocate((1, 2, 3)), Free((3,)), Free(()),
        AppendPrompt(5, _rand((2, 9, 2, 64), BF16), _rand((2, 9, 2, 64), BF16)),
        Attend(1, np.array([4, 9], np.int64), _rand((2, 8, 64), np.float32), _rand((2, 2, 64), np.float32),
               _rand((2, 2, 64), np.float32), want_lse=True),
        Attend(0, np.zeros(0, np.int64), np.zeros((0, 4, 8), np.float16), np.zeros((0, 2, 8), np.float16),
               np.zeros((0, 2, 8), np.float16)),
        AttendResult(_rand((2, 8, 64), BF16), _rand((2, 8), np.float32)),
        AttendResult(_rand((3, 4, 16), np.float16)),
        GetStats(),
    ]


def assert_same_message(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f.name
        else:
            assert x == y and type(x) is type(y), f.name


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(message) -> None:
    codec = Codec(SHARD_CHANNEL)
    request_id, decoded = codec.decode(codec.encode(123456789, message))
    assert request_id == 123456789
    assert_same_message(message, decoded)


def test_every_channel_class_is_covered_by_the_samples() -> None:
    assert {type(m) for m in sample_messages()} == set(SHARD_CHANNEL.message_classes)


def test_big_arrays_travel_as_own_frames_and_are_received_zero_copy() -> None:
    codec = Codec(SHARD_CHANNEL)
    q, k, v = _rand((64, 32, 128), BF16), _rand((64, 8, 128), BF16), _rand((64, 8, 128), BF16)
    message = Attend(3, np.arange(64, dtype=np.int64), q, k, v)
    frames = codec.encode(1, message)
    # envelope + q + k + v (seq_ids is 512 bytes, within the inline threshold: it rides in the envelope)
    assert len(frames) == 4
    assert len(frames[0]) < 64 * 8 + 400  # the envelope never carries the big payloads
    for array in (q, k, v):
        assert any(np.shares_memory(array, f) for f in frames[1:]), "sender copied an array"
    received = [bytes(f) for f in frames]  # what a socket would deliver: separate buffers
    _, decoded = codec.decode(received)
    for name, frame in zip(("q", "k", "v"), received[1:]):
        array = getattr(decoded, name)
        assert np.shares_memory(array, np.frombuffer(frame, np.uint8)), name
        assert not array.flags.writeable
    assert np.array_equal(decoded.seq_ids, np.arange(64)) and not decoded.seq_ids.flags.writeable
    assert decoded.q.dtype == BF16 and np.array_equal(decoded.q.view(np.uint16), q.view(np.uint16))


def test_an_array_just_over_the_inline_threshold_gets_its_own_frame() -> None:
    codec = Codec(SHARD_CHANNEL)
    num_seqs = DEFAULT_INLINE_THRESHOLD // 8 + 1  # int64 seq_ids one entry over the threshold
    q = _rand((num_seqs, 4, 8), np.float32)
    kv = _rand((num_seqs, 1, 8), np.float32)
    message = Attend(0, np.arange(num_seqs, dtype=np.int64), q, kv, kv)
    frames = codec.encode(1, message)
    assert len(frames) == 5  # envelope + seq_ids + q + k + v
    assert any(np.shares_memory(message.seq_ids, f) for f in frames[1:])
    assert_same_message(message, codec.decode([bytes(f) for f in frames])[1])


def test_small_arrays_are_inline() -> None:
    codec = Codec(SHARD_CHANNEL)
    message = AttendResult(np.ones((1, 4, 8), np.float32), np.zeros((1, 4), np.float32))  # 128 + 16 bytes
    frames = codec.encode(1, message)
    assert len(frames) == 1
    assert_same_message(message, codec.decode(frames)[1])


def test_non_contiguous_arrays_are_sent_correctly() -> None:
    codec = Codec(SHARD_CHANNEL)
    big = _rand((4, 16, 64), np.float32)
    o = big[:, ::2, :]
    assert not o.flags.c_contiguous
    _, decoded = codec.decode([bytes(f) for f in codec.encode(1, AttendResult(o))])
    assert np.array_equal(decoded.o, o)


def _envelope(kind, request_id, values, version=VERSION) -> bytes:
    return msgpack.packb([version, kind, request_id, values], use_bin_type=True)


def _array_ext(dtype: str, shape, payload) -> list:
    return [dtype, list(shape), payload]


@pytest.mark.parametrize(
    "frames, has_request_id",
    [
        ([], False),
        ([b"\xc1"], False),  # never-used msgpack byte
        ([b"\x94\x01"], False),  # truncated array
        ([msgpack.packb({"a": 1})], False),
        ([_envelope(17, -1, [])], False),
        ([_envelope(200, 5, [])], True),  # unknown kind
        ([_envelope(23, 5, [], version=9)], True),
        ([_envelope(17, 5, [1, 2, 3])], True),  # wrong field count
        ([_envelope(17, 5, [1, 2, 3, 4])], True),  # kv_dtype must be str
        ([_envelope(17, 5, [1, 2, 3, "int8"])], True),  # post_init refuses
        ([_envelope(17, 5, [True, 2, 3, "float32"])], True),  # bool is not int
        ([_envelope(18, 5, [[1, "x"]])], True),
        ([_envelope(18, 5, [[1, 1]])], True),  # duplicate seq ids
        ([_envelope(21, 5, [_array_ext("float32", (1, 2, 2), 1), None])], True),  # frame missing
        ([_envelope(21, 5, [_array_ext("float32", (1, 2, 2), 1), None]), b"x" * 15], True),  # size mismatch
        ([_envelope(21, 5, [_array_ext("object", (1, 2, 2), 1), None]), b"x" * 16], True),
        ([_envelope(21, 5, [_array_ext("float32", (1, 2, 2), 1), None]), b"x" * 16, b"y"], True),  # extra
        ([_envelope(21, 5, [_array_ext("float32", (4,), b"x" * 16), None])], True),  # wrong rank
        ([_envelope(21, 5, [_array_ext("int32", (1, 2, 2), b"x" * 16), None])], True),  # dtype outside o's rule
        ([_envelope(22, 5, [4096, _array_ext("int64", (1,), b"\0" * 8), _array_ext("float32", (1, 4, 2), b"\0" * 32),
                            _array_ext("float32", (1, 2, 2), b"\0" * 16), _array_ext("float32", (1, 2, 2), b"\0" * 16),
                            False])], True),  # layer outside its int_field range
        ([_envelope(21, 5, [_array_ext("float32", (1, -2, 2), 1), None]), b"x" * 16], True),
        ([_envelope(21, 5, [msgpack.ExtType(9, b""), None])], True),
        ([_envelope(21, 5, [["float32", [1, 1, 1]], None])], True),  # descriptor too short
        ([_envelope(21, 5, [["float32", [1, 1, 1], 1.5], None])], True),  # payload neither bytes nor index
        ([_envelope(23, 5, [_array_ext("float32", (1,), b"abcd")])], True),  # GetStats has no fields
        ([_envelope(21, 5, [_array_ext("float32", (1, 1, 1), b"abcd"), "lse"])], True),
        ([_envelope(22, 5, [0, _array_ext("int64", (1,), b"\0" * 8), _array_ext("float32", (1, 4, 2), b"\0" * 32),
                            _array_ext("float32", (1, 3, 2), b"\0" * 24), _array_ext("float32", (1, 3, 2), b"\0" * 24),
                            False])], True),  # 4 q heads over 3 kv heads
    ],
)
def test_bad_messages_raise_protocol_error(frames, has_request_id) -> None:
    codec = Codec(SHARD_CHANNEL)
    with pytest.raises(ProtocolError) as info:
        codec.decode(frames)
    assert (info.value.request_id == 5) if has_request_id else info.value.request_id is None


def test_pong_carries_a_64_bit_instance_id_and_the_drain_and_refuses_anything_else() -> None:
    codec = Codec(SHARD_CHANNEL)
    for instance_id in (0, 12345, 2**64 - 1):
        for is_draining in (False, True):
            _, pong = codec.decode(codec.encode(5, Pong(instance_id, is_draining)))
            assert type(pong) is Pong and (pong.instance_id, pong.is_draining) == (instance_id, is_draining)
    for bad in ("12345", True, None, -1, 1.5, b"\x01"):
        with pytest.raises(ProtocolError, match="instance_id") as info:
            codec.decode([_envelope(Pong.KIND, 5, [bad, False])])
        assert info.value.request_id == 5
    with pytest.raises(ProtocolError, match="expected 2 fields"):
        codec.decode([_envelope(Pong.KIND, 5, [])])  # a Pong without an instance id
    for bad in ("12345", True, -1, 2**64):
        with pytest.raises(ValueError, match="instance_id"):
            Pong(bad)


def test_max_message_size_is_enforced_both_ways() -> None:
    codec = Codec(SHARD_CHANNEL, max_message_bytes=4096)
    big = AttendResult(np.zeros((2, 8, 64), np.float32))  # 4 KiB of payload plus the envelope
    with pytest.raises(ProtocolError, match="maximum"):
        codec.encode(9, big)
    frames = [bytes(f) for f in Codec(SHARD_CHANNEL).encode(9, big)]
    with pytest.raises(ProtocolError, match="maximum") as info:
        codec.decode(frames)
    assert info.value.request_id == 9


def test_encode_refuses_foreign_messages_and_bad_ids() -> None:
    codec = Codec(SHARD_CHANNEL)
    with pytest.raises(TypeError):
        codec.encode(1, object())
    with pytest.raises(ValueError):
        codec.encode(-1, Ok())


def test_message_validation_runs_on_construction() -> None:
    with pytest.raises(ValueError):
        Configure(num_layers=0, num_kv_heads=8, head_dim=128, kv_dtype="float32")
    with pytest.raises(ValueError):
        AttendResult(np.zeros((2, 4, 8), np.int32))
    with pytest.raises(ValueError):
        Attend(0, np.array([1, 2], np.int32), np.zeros((2, 4, 8), np.float32), np.zeros((2, 2, 8), np.float32),
               np.zeros((2, 2, 8), np.float32))  # seq_ids must be int64
    with pytest.raises(ValueError):
        Attend(0, np.array([1, 2], np.int64), np.zeros((2, 4, 8), np.float32), np.zeros((2, 2, 8), np.float32),
               np.zeros((3, 2, 8), np.float32))


def _valid_encodings() -> list[list[bytes]]:
    codec = Codec(SHARD_CHANNEL)
    return [[bytes(f) for f in codec.encode(7, m)] for m in sample_messages()]


@st.composite
def mutated_frames(draw) -> list[bytes]:
    frames = list(draw(st.sampled_from(_valid_encodings())))
    action = draw(st.sampled_from(["truncate", "flip", "drop_frame", "add_frame", "garbage", "replace_head"]))
    index = draw(st.integers(0, len(frames) - 1))
    if action == "truncate":
        frames[index] = frames[index][: draw(st.integers(0, max(0, len(frames[index]) - 1)))]
    elif action == "flip" and frames[index]:
        pos = draw(st.integers(0, len(frames[index]) - 1))
        data = bytearray(frames[index])
        data[pos] ^= draw(st.integers(1, 255))
        frames[index] = bytes(data)
    elif action == "drop_frame":
        del frames[index]
    elif action == "add_frame":
        frames.append(draw(st.binary(max_size=64)))
    elif action == "garbage":
        frames = draw(st.lists(st.binary(max_size=64), max_size=4))
    else:
        head = draw(st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=4), st.none(),
                                       st.lists(st.integers(0, 9), max_size=3)), max_size=5))
        frames[0] = msgpack.packb(head)
    return frames


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_fuzzed_frames_decode_or_raise_protocol_error(frames) -> None:
    codec = Codec(SHARD_CHANNEL)
    try:
        request_id, message = codec.decode(frames)
    except ProtocolError:
        return
    # whatever decodes must be a valid message that re-encodes
    assert type(message) in SHARD_CHANNEL.message_classes
    codec.encode(request_id, message)


def test_field_rules_are_collected_from_the_declarations_and_checked_on_construction() -> None:
    assert [name for name, _ in Attend.FIELD_RULES] == ["layer", "seq_ids", "q", "k", "v"]
    with pytest.raises(ValueError, match="layer"):
        Attend(4096, np.zeros(1, np.int64), np.zeros((1, 4, 2), np.float32), np.zeros((1, 2, 2), np.float32),
               np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="lse"):
        AttendResult(np.zeros((1, 4, 2), np.float32), np.zeros((1, 4), np.float16))


def test_an_optional_array_rule_must_match_its_annotation() -> None:
    @dataclasses.dataclass(frozen=True)
    class Mismatched(Message):
        KIND = 60
        x: np.ndarray | None = array_field(ndim=1, dtypes=("float32",))  # is_optional missing

    with pytest.raises(TypeError, match="is_optional"):
        Channel("mismatched", (Mismatched,))


def test_the_decoders_in_line_path_and_its_fallback_agree() -> None:
    """The generated decoder takes a well-formed array in line and hands anything else to decode_array."""
    codec = Codec(SHARD_CHANNEL, inline_threshold=0)  # every array, seq_ids too, in a frame of its own
    message = Attend(2, np.array([7, 8], np.int64), _rand((2, 4, 8), np.float32), _rand((2, 2, 8), np.float32),
                     _rand((2, 2, 8), np.float32))
    frames = [bytes(f) for f in codec.encode(1, message)]
    assert len(frames) == 5
    assert_same_message(message, codec.decode(frames)[1])
    with pytest.raises(ProtocolError, match="needs"):  # q's frame one item short: the fallback names the field
        codec.decode(frames[:2] + [frames[2][:-4]] + frames[3:])
