"""The per-layer dense segments under torch.compile give the eager results, for any batch size."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fastdecode.actors.model import load_model


def _segments(model, num_rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, model.config.hidden_size, generator=generator).to(model.device, model.dtype)
    positions = torch.randint(0, 200, (num_rows,), generator=generator).to(model.device)
    q, k, v = model.pre_attention(0, x, positions)
    cos, sin = model.rope_at(positions)
    # the step form writes k and v into pool rows: a pool with room for four steps, rows picked at random
    num_written, head_dim = 2 * num_rows * model.config.num_kv_heads, model.config.head_dim
    write_index = torch.randperm(4 * num_written, generator=generator)[:num_written].to(model.device)
    first_rows, between_rows = (torch.zeros(4 * num_written, head_dim, dtype=model.dtype, device=model.device)
                                for _ in range(2))
    first_q = model.step_first(x, cos, sin, first_rows, write_index)
    # post-attention of layer 0, pre-attention of layer 1
    between = model.step_between(0, x, q, cos, sin, between_rows, write_index)
    untouched = torch.ones(4 * num_written, dtype=torch.bool, device=model.device)
    untouched[write_index] = False
    assert not first_rows[untouched].any() and not between_rows[untouched].any()
    if model.dtype == torch.float32:  # the step form: the same q, k and v, the same next layer
        torch.testing.assert_close(first_q, q, rtol=0, atol=0)
        torch.testing.assert_close(first_rows[write_index], torch.stack((k, v)).view(-1, head_dim), rtol=0, atol=0)
        after = model.post_attention(0, x, q)
        later_q, later_k, later_v = model.pre_attention(1, after, positions)
        written = between_rows[write_index]
        for got, want in zip((*between, written), (after, later_q, torch.stack((later_k, later_v)).view(-1, head_dim))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return q, k, v, model.post_attention(1, x, q), first_q, first_rows, *between, between_rows


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])  # tiny-qwen3: the q/k norms in every segment
@torch.no_grad()
def test_traced_segments_match_eager_across_batch_sizes_without_recompiling_per_layer(preset):
    model, _ = load_model(f"random:{preset}", dtype="float32", device="cpu", seed=3)
    expected = {rows: _segments(model, rows, rows) for rows in (1, 3, 8, 5)}
    model.compile_dense(backend="aot_eager")
    assert model.is_dense_compiled
    for rows, eager in expected.items():
        for got, want in zip(_segments(model, rows, rows), eager):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    graphs = counters["stats"]["unique_graphs"]
    x = torch.randn(6, model.config.hidden_size)
    for layer in range(model.num_layers):  # every layer reuses the one compiled function
        x = model.post_attention(layer, x, model.pre_attention(layer, x, torch.arange(6))[0])
    assert counters["stats"]["unique_graphs"] == graphs
    model.compile_dense(False)  # back to eager: same results again, nothing compiled is used
    assert not model.is_dense_compiled
    for got, want in zip(_segments(model, 3, 3), expected[3]):
        assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
@torch.no_grad()
def test_inductor_segments_on_cuda_are_close_to_eager(preset):
    model, _ = load_model(f"random:{preset}", dtype="bfloat16", device="cuda", seed=3)
    expected = {rows: _segments(model, rows, rows) for rows in (1, 4, 16)}
    model.compile_dense()
    assert model.is_dense_compiled
    for rows, eager in expected.items():
        for got, want in zip(_segments(model, rows, rows), eager):
            # bf16 rounding differs where fused kernels keep float32 between ops: 2% of the scale
            error = (got.float() - want.float()).abs().max().item()
            assert error <= 0.02 * want.float().abs().max().item(), (rows, error)
