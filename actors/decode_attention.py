"""Split-KV decode attention in Triton for the GPU KV node's whole-step program (``StaticAttention`` kind
``"triton"``).

One query token per row; a row's KV heads each have ``G`` query heads (GQA). Each program takes one
(row, KV head, split): it reads that head's keys and values once for all ``G`` of its query heads (padded
to 16 for the tensor cores), over the split's columns below the row's length, with a float32 online
softmax, and writes the split's output and log-sum-exp. A second kernel merges the splits of each query
head. The number of splits is fixed per batch size, so shapes never change from one step to the next, and
the lengths are read on the device: a CUDA graph can hold both kernels. Columns past a row's length are
neither read nor counted, so ragged rows cost what they hold.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the other attention kinds serve
    triton = tl = None

LOG2E = 1.4426950408889634
MIN_GROUP_ROWS = 16  # the tensor cores' smallest M: the G query heads are padded to this


def runs(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernels take this KV dtype and head dim (and Triton is installed; the device must be
    CUDA): fp16/bf16, a power-of-two head dim of at least 16."""
    return (triton is not None and dtype in (torch.float16, torch.bfloat16) and head_dim >= 16
            and head_dim & (head_dim - 1) == 0)


@dataclass(frozen=True)
class Plan:
    """How a batch's attention is cut: columns per block of the inner loop, software pipeline stages,
    columns per split (a multiple of ``block_n``; the number of columns or more: no split)."""
    block_n: int
    num_stages: int
    split_cols: int


@functools.lru_cache(maxsize=None)
def plan(num_rows: int, num_kv_heads: int, num_columns: int, num_sms: int) -> Plan:
    """The cut for a batch. Rows × KV heads programs that fill the multiprocessors run unsplit, in
    blocks of 64 columns. Fewer are split: into single blocks of 32 columns when even one program per 64
    columns would make at most two waves (1–2 rows of Llama-3-8B shapes), else into splits of at least
    two 64-column blocks until they make about two waves. On the H100 (132 SMs, 8 KV heads of 4 query
    heads, 560 columns, 32 layers per CUDA graph; ``docs/benchmarks.md``), per layer: 1 row 7.0 µs,
    4 rows 9.8, 16 rows 17.8, 64 rows 47.5 (2.8 TB/s), against 10.4 / 13.9 / 19.0 / 50.8 for the compiled
    matmul form and flex attention."""
    programs = num_rows * num_kv_heads
    if programs >= num_sms:
        return Plan(64, 2, -(-num_columns // 64) * 64)
    if programs * -(-num_columns // 64) <= 2 * num_sms:
        return Plan(32, 4, 32)
    num_blocks = -(-num_columns // 64)
    splits = max(1, min(-(-num_blocks // 2), -(-2 * num_sms // programs)))
    return Plan(64, 2, -(-num_blocks // splits) * 64)


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, lengths_ptr, o_ptr, lse_ptr,
                      stride_qr, stride_qh, stride_qg,
                      stride_kr, stride_kh, stride_kc,
                      stride_vr, stride_vh, stride_vc,
                      stride_or, stride_oh, stride_os, stride_og,
                      stride_lr, stride_lh, stride_ls,
                      scale_log2,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLIT_COLS: tl.constexpr, IS_SPLIT: tl.constexpr):
        row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(lengths_ptr + row).to(tl.int32)
        start = split * SPLIT_COLS
        end = tl.minimum(start + SPLIT_COLS, length)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row * stride_qr + head * stride_qh + g[:, None] * stride_qg + d[None, :],
                    mask=g[:, None] < GROUP, other=0.0)
        k_base = k_ptr + row * stride_kr + head * stride_kh
        v_base = v_ptr + row * stride_vr + head * stride_vh
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            held = cols < end
            k = tl.load(k_base + cols[:, None] * stride_kc + d[None, :], mask=held[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # [GROUP_PAD, BLOCK_N], log2 units
            s = tl.where(held[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vc + d[None, :], mask=held[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        safe_total = tl.where(total > 0, total, 1.0)
        out = acc / safe_total[:, None]
        o_at = o_ptr + row * stride_or + head * stride_oh + split * stride_os + g[:, None] * stride_og + d[None, :]
        tl.store(o_at, out.to(o_ptr.dtype.element_ty), mask=g[:, None] < GROUP)
        if IS_SPLIT:  # log2-sum-exp of the split; -inf for a split past the row's length
            lse = tl.where(total > 0, m + tl.log2(safe_total), float("-inf"))
            tl.store(lse_ptr + row * stride_lr + head * stride_lh + split * stride_ls + g, lse, mask=g < GROUP)

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, o_ptr,
                      stride_pr, stride_ph, stride_ps, stride_pg,
                      stride_lr, stride_lh, stride_ls,
                      stride_or, stride_oh, stride_og,
                      HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
        row, head, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        lse = tl.load(lse_ptr + row * stride_lr + head * stride_lh + s * stride_ls + g,
                      mask=s < NUM_SPLITS, other=float("-inf"))
        top = tl.max(lse, 0)
        weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # all -inf: a row of no columns
        total = tl.sum(weight, 0)
        weight = weight / tl.where(total > 0, total, 1.0)
        part = tl.load(part_ptr + row * stride_pr + head * stride_ph + s[:, None] * stride_ps + g * stride_pg
                       + d[None, :], mask=s[:, None] < NUM_SPLITS, other=0.0)
        out = tl.sum(part * weight[:, None], 0)
        tl.store(o_ptr + row * stride_or + head * stride_oh + g * stride_og + d, out.to(o_ptr.dtype.element_ty))


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, *, num_sms: int, cut: Plan | None = None, num_warps: int = 4) -> torch.Tensor:
    """``query[rows, Hkv, G, D]`` over the first ``lengths[r]`` columns of ``keys/values[rows, Hkv, C, D]``:
    ``[rows, Hkv, G, D]`` in the query's dtype (zeros for a row of length 0). ``cut`` overrides
    ``plan``'s for this batch."""
    num_rows, num_kv_heads, group, head_dim = query.shape
    num_columns = keys.shape[2]
    cut = cut or plan(num_rows, num_kv_heads, num_columns, num_sms)
    block_n, split_cols = cut.block_n, cut.split_cols
    num_splits = -(-num_columns // split_cols)
    out = torch.empty_like(query)
    group_pad = max(MIN_GROUP_ROWS, triton.next_power_of_2(group))
    is_split = num_splits > 1
    if is_split:
        part = torch.empty(num_rows, num_kv_heads, num_splits, group, head_dim, dtype=torch.float32,
                           device=query.device)
        lse = torch.empty(num_rows, num_kv_heads, num_splits, group, dtype=torch.float32, device=query.device)
        part_strides, lse_strides = part.stride()[:4], lse.stride()[:3]
    else:
        part, lse = out, out  # lse is not written
        part_strides, lse_strides = (out.stride(0), out.stride(1), 0, out.stride(2)), (0, 0, 0)
    _split_kernel[(num_rows, num_kv_heads, num_splits)](
        query, keys, values, lengths, part, lse,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        *part_strides, *lse_strides,
        scale * LOG2E,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_N=block_n, SPLIT_COLS=split_cols,
        IS_SPLIT=is_split, num_warps=num_warps, num_stages=cut.num_stages)
    if is_split:
        _merge_kernel[(num_rows, num_kv_heads, group)](  # a program per query head
            part, lse, out, *part.stride()[:4], *lse.stride()[:3], out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=2)
    return out
