"""The Triton split-KV decode attention: its cut per batch, and its results against a float64 reference
(on CUDA, and on the CPU through Triton's interpreter where Triton is installed)."""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from fastdecode.actors.decode_attention import decode_attention, plan, Plan


@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 8, 16, 32, 64, 256])
@pytest.mark.parametrize("num_columns", [16, 560, 4112])
def test_plan_cuts_whole_blocks_and_splits_only_a_small_batch(num_rows, num_columns):
    num_sms, num_kv_heads = 132, 8
    cut = plan(num_rows, num_kv_heads, num_columns, num_sms)
    assert cut.block_n in (32, 64) and cut.split_cols % cut.block_n == 0
    num_splits = -(-num_columns // cut.split_cols)
    programs = num_rows * num_kv_heads
    if programs >= num_sms:  # enough programs: whole rows, no merge
        assert (num_splits, cut.block_n) == (1, 64)
    elif cut.block_n == 32:  # far too few even at one program per 64 columns: a split per block
        assert programs * -(-num_columns // 64) <= 2 * num_sms and cut.split_cols == 32
    else:  # about two waves of programs, at least two blocks each
        assert num_splits <= -(-2 * num_sms // programs) and cut.split_cols >= min(128, num_columns)


def reference(query, keys, values, lengths, scale):
    """float64 softmax attention of each row over its first lengths[r] columns (zeros for none)."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    for r, n in enumerate(lengths.tolist()):
        if n:
            scores = torch.einsum("hgd,hcd->hgc", query[r].double(), keys[r, :, :n].double()) * scale
            out[r] = torch.einsum("hgc,hcd->hgd", scores.softmax(-1), values[r, :, :n].double())
    return out


CASES = [  # rows, KV heads, group, head dim, columns, cut (None: the plan's), a first row of no columns
    (3, 2, 4, 64, 200, None, False),
    (1, 1, 4, 64, 200, None, False),  # split by the plan at 4 SMs: a split per block of 32
    (2, 2, 8, 128, 130, Plan(64, 2, 64), False),
    (4, 1, 1, 16, 96, Plan(32, 2, 32), True),
    (2, 2, 4, 64, 256, Plan(64, 2, 256), True),
]


def check_cases(device: str, dtype: torch.dtype, tolerance: float, num_sms: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for rows, num_kv_heads, group, head_dim, columns, cut, is_first_empty in CASES:
        query = torch.randn(rows, num_kv_heads, group, head_dim, generator=generator).to(dtype)
        pool = torch.randn(2, rows + 1, num_kv_heads, columns, head_dim, generator=generator).to(dtype)
        keys, values = pool[0, :rows], pool[1, :rows]  # views of a pool, as the GPU KV node passes them
        # lengths at block edges: 1, a block - 1, a block, a block + 1, all columns; garbage past them
        lengths = torch.tensor([1, 31, 32, 33, 63, 64, 65, columns][:rows - 1] + [columns])
        lengths[0] = 0 if is_first_empty else lengths[0]
        keys.masked_fill_((torch.arange(columns) >= lengths[:, None])[:, None, :, None], 1e4)
        scale = 1 / math.sqrt(head_dim)
        got = decode_attention(query.to(device), keys.to(device), values.to(device), lengths.to(device), scale,
                               num_sms=num_sms, cut=cut)
        want = reference(query, keys, values, lengths, scale)
        error = (got.double().cpu() - want).abs().max().item()
        assert error < tolerance, (rows, num_kv_heads, group, head_dim, columns, cut, error)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_float64_reference_on_cuda():
    check_cases("cuda", torch.bfloat16, 0.02, torch.cuda.get_device_properties(0).multi_processor_count)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")
@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="the [test] extra brings Triton on Linux x86-64 only")
def test_matches_float64_reference_in_tritons_interpreter():
    """The same kernels run by Triton's CPU interpreter (float16: it has no bfloat16), in a process of its own
    (the interpreter is chosen when the kernels are defined). Triton is in the [test] extra: without it this fails
    rather than skips, so CI always runs the kernels."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from test_decode_attention import check_cases; "
            "check_cases('cpu', torch.float16, 2e-3, 4)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
