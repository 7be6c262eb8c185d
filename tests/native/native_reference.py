"""Shared by the native-library tests: a float64 NumPy attention reference and data builders."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from fastdecode.native.lib import available_isas

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
ISAS = available_isas()


def attention_reference(q: np.ndarray, keys: list[np.ndarray], values: list[np.ndarray]):
    """float64 GQA attention of q [B, Hq, D] over per-sequence K/V [T_b, Hkv, D]: (o [B, Hq, D], lse [B, Hq])."""
    batch, num_q_heads, head_dim = q.shape
    out = np.empty((batch, num_q_heads, head_dim))
    lse = np.empty((batch, num_q_heads))
    for b, (k, v) in enumerate(zip(keys, values)):
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        qb = q[b].astype(np.float64).reshape(num_kv_heads, group, head_dim)
        s = np.einsum("hgd,thd->hgt", qb, k.astype(np.float64)) / np.sqrt(head_dim)
        m = s.max(-1, keepdims=True)
        e = np.exp(s - m)
        denom = e.sum(-1, keepdims=True)
        out[b] = np.einsum("hgt,thd->hgd", e / denom, v.astype(np.float64)).reshape(num_q_heads, head_dim)
        lse[b] = (m + np.log(denom)).reshape(num_q_heads)
    return out, lse


def random_kv(rng, shape, kv_dtype: str, src_dtype: str = "float32", key_scale: np.ndarray | None = None):
    """(k, v) in src_dtype, plus what the pool must store: the values rounded to kv_dtype, as float64.
    key_scale (one factor per token) stretches the keys, and so the scores, token by token."""
    k = rng.standard_normal(shape, dtype=np.float32)
    if key_scale is not None:
        k *= key_scale[:shape[0], None, None].astype(np.float32)
    k = k.astype(DTYPES[src_dtype])
    v = rng.standard_normal(shape, dtype=np.float32).astype(DTYPES[src_dtype])
    as_stored = [x.astype(np.float32).astype(DTYPES[kv_dtype]).astype(np.float64) for x in (k, v)]
    return k, v, as_stored[0], as_stored[1]
