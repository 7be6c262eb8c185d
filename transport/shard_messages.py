"""The Executor <-> KVShard channel.

Requests (Executor -> shard) and their replies; kinds 16..63.  Shapes use the
Llama naming: L layers, T tokens, B sequences, Hq query heads, Hkv KV heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastdecode.transport.control_messages import CONTROL_MESSAGES, Ok
from fastdecode.transport.messages import Channel, Message, array_field, int_field, require_int

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
KV_DTYPES = FLOAT_DTYPES
MAX_SEQ_ID = 2**63 - 1


def _check_seq_ids(seq_ids: tuple[int, ...], name: str) -> None:
    for seq_id in seq_ids:
        require_int(seq_id, f"{name} entry", max_value=MAX_SEQ_ID)
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"{name} has duplicates")


@dataclass(frozen=True)
class ShardStats(Message):
    """What a shard reports: memory, speed, and the model shape it is configured for.

    ``attn_gbps`` is a moving average of bytes of KV read per second of attend
    calls; ``calibrated_gbps`` and ``attend_overhead_s`` come from the short
    benchmark run at configure time (the ``a`` and bandwidth of the performance
    model ``T = a + bytes / bandwidth``).  Model fields are None until configured.
    """

    KIND = 16
    capacity_bytes: int
    used_bytes: int
    num_sequences: int
    num_free_pages: int
    num_total_pages: int
    page_size: int
    bytes_per_token: int  # all layers, K and V
    num_threads: int
    isa: str
    attn_gbps: float
    calibrated_gbps: float
    attend_overhead_s: float
    num_attend_calls: int
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    kv_dtype: str | None = None

    @property
    def is_configured(self) -> bool:
        return self.num_layers is not None


@dataclass(frozen=True)
class Configure(Message):
    """Tell the shard the model's KV shape; the pool is created on the first one.

    ``session_id`` names the client's run (an Executor draws one at start and keeps it
    across reconnects). A Configure from another session first frees every sequence
    the previous session left (a client killed without freeing them would otherwise
    hold their memory and their ids for good); 0 is "no session" and frees nothing.
    Then a different shape is refused unless the pool holds no sequence (then the
    pool is re-created); the same shape again is a no-op.
    """

    KIND = 17
    REPLY = ShardStats
    num_layers: int = int_field(min_value=1, max_value=4096)
    num_kv_heads: int = int_field(min_value=1, max_value=4096)
    head_dim: int = int_field(min_value=1, max_value=4096)
    kv_dtype: str
    session_id: int = int_field(max_value=(1 << 63) - 1, default=0)

    @property
    def shape(self) -> tuple[int, int, int, str]:
        return self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype

    def validate(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")


@dataclass(frozen=True)
class Allocate(Message):
    KIND = 18
    REPLY = Ok
    seq_ids: tuple[int, ...]

    def validate(self) -> None:
        _check_seq_ids(self.seq_ids, "seq_ids")


@dataclass(frozen=True)
class Free(Message):
    KIND = 19
    REPLY = Ok
    seq_ids: tuple[int, ...]

    def validate(self) -> None:
        _check_seq_ids(self.seq_ids, "seq_ids")


@dataclass(frozen=True)
class AppendPrompt(Message):
    """A prompt's (or a chunk of a prompt's) K/V for all layers: k, v are [L, T, Hkv, D]."""

    KIND = 20
    REPLY = Ok
    seq_id: int = int_field(max_value=MAX_SEQ_ID)
    k: np.ndarray = array_field(ndim=4, dtypes=FLOAT_DTYPES)
    v: np.ndarray = array_field(ndim=4, dtypes=FLOAT_DTYPES)

    def validate(self) -> None:
        if self.k.shape != self.v.shape or self.k.dtype != self.v.dtype:
            raise ValueError(f"k and v must match: {self.k.shape} {self.k.dtype} vs {self.v.shape} {self.v.dtype}")


@dataclass(frozen=True)
class AttendResult(Message):
    """o is [B, Hq, D] in q's dtype; lse [B, Hq] float32 when asked for."""

    KIND = 21
    o: np.ndarray = array_field(ndim=3, dtypes=FLOAT_DTYPES)
    lse: np.ndarray | None = array_field(ndim=2, dtypes=("float32",), is_optional=True, default=None)

    def validate(self) -> None:
        if self.lse is not None and self.lse.shape != self.o.shape[:2]:
            raise ValueError(f"lse shape {self.lse.shape} does not match o {self.o.shape}")


@dataclass(frozen=True)
class Attend(Message):
    """One decode step of one layer: append k, v [B, Hkv, D] to each sequence, attend with q [B, Hq, D].

    Only shapes and dtypes are checked here (cheap, on the event loop); the shard
    checks the sequence ids themselves (known, distinct) on its worker thread.
    """

    KIND = 22
    REPLY = AttendResult
    layer: int = int_field(max_value=4095)
    seq_ids: np.ndarray = array_field(ndim=1, dtypes=("int64",))  # [B]
    q: np.ndarray = array_field(ndim=3, dtypes=FLOAT_DTYPES)
    k: np.ndarray = array_field(ndim=3, dtypes=FLOAT_DTYPES)
    v: np.ndarray = array_field(ndim=3, dtypes=FLOAT_DTYPES)
    want_lse: bool = False

    def validate(self) -> None:
        q, k = self.q, self.k
        num_seqs, num_q_heads, head_dim = q.shape
        k_shape, dtype = k.shape, k.dtype
        if k_shape != self.v.shape or self.v.dtype != dtype or q.dtype != dtype:
            raise ValueError("q, k and v must share a dtype and k, v a shape")
        num_kv_seqs, num_kv_heads, kv_head_dim = k_shape
        if num_kv_seqs != num_seqs or len(self.seq_ids) != num_seqs or kv_head_dim != head_dim:
            raise ValueError(f"shapes disagree: seq_ids {self.seq_ids.shape}, q {q.shape}, k {k_shape}")
        if num_kv_heads == 0 or num_q_heads % num_kv_heads:
            raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")


@dataclass(frozen=True)
class GetStats(Message):
    KIND = 23
    REPLY = ShardStats


SHARD_CHANNEL = Channel(
    "shard",
    CONTROL_MESSAGES + (ShardStats, Configure, Allocate, Free, AppendPrompt, AttendResult, Attend, GetStats),
)
