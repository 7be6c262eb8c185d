"""Every static attention kind against the SDPA one, over rows of ragged lengths, batch sizes in turn
(one StaticAttention serves every bucket: the flex mask reads lengths from its own buffer)."""
from __future__ import annotations

import math

import pytest
import torch

from fastdecode.actors.static_attention import StaticAttention

NUM_KV_HEADS, GROUP, HEAD_DIM, COLUMNS = 2, 4, 16, 160


def _outputs(kind: str, device: str, dtype: torch.dtype, backend: str, batches) -> list[torch.Tensor]:
    attention = StaticAttention(kind, num_slots=max(batches), num_columns=COLUMNS, head_dim=HEAD_DIM,
                                scale=1 / math.sqrt(HEAD_DIM), dtype=dtype, device=torch.device(device),
                                compile_backend=backend)
    generator = torch.Generator().manual_seed(0)
    outputs = []
    for rows in batches:
        keys, values = (torch.randn(rows, NUM_KV_HEADS, COLUMNS, HEAD_DIM, generator=generator).to(device, dtype)
                        for _ in range(2))
        query = torch.randn(rows, NUM_KV_HEADS, GROUP, HEAD_DIM, generator=generator).to(device, dtype)
        lengths = torch.randint(1, COLUMNS - 1, (rows,), generator=generator).to(device)
        # what lies past a row's length must not count: garbage there
        keys.masked_fill_((torch.arange(COLUMNS, device=device) >= lengths[:, None])[:, None, :, None], 1e4)
        outputs.append(attention(query, keys, values, attention.mask(lengths)).float().cpu())
    return outputs


@pytest.mark.parametrize("kind", ["matmul", "compiled", "flex"])
def test_kinds_match_sdpa_over_ragged_rows(kind):
    batches = (1, 3, 8, 2)
    expected = _outputs("sdpa", "cpu", torch.float32, "aot_eager", batches)
    for got, want in zip(_outputs(kind, "cpu", torch.float32, "aot_eager", batches), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kinds_match_sdpa_over_ragged_rows_cuda():
    batches = (1, 4, 64, 16, 128)
    expected = _outputs("sdpa", "cuda", torch.bfloat16, "inductor", batches)
    for kind in ("compiled", "flex", "triton", "auto"):
        for got, want in zip(_outputs(kind, "cuda", torch.bfloat16, "inductor", batches), expected):
            torch.testing.assert_close(got, want, atol=0.03, rtol=0.03)


def test_triton_kind_needs_cuda_and_auto_falls_back_on_cpu():
    with pytest.raises(ValueError, match="triton"):
        StaticAttention("triton", num_slots=2, num_columns=COLUMNS, head_dim=HEAD_DIM, scale=1.0,
                        dtype=torch.bfloat16, device=torch.device("cpu"))
    auto = StaticAttention("auto", num_slots=2, num_columns=COLUMNS, head_dim=HEAD_DIM, scale=1.0,
                           dtype=torch.bfloat16, device=torch.device("cpu"))
    assert auto.kind_for(1) == auto.kind_for(64) == "sdpa"
