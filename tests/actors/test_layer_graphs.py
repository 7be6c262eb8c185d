"""Dense segments of the shard path as CUDA graphs (layer_graphs): graphed equals eager, padding rows
change nothing, lanes keep their own buffers; CPU models are refused."""
from __future__ import annotations

import pytest
import torch

from fastdecode.actors.layer_graphs import EagerDense, GraphDense, LayerGraphs
from fastdecode.actors.model import load_model


def test_layer_graphs_need_cuda(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="CUDA"):
        LayerGraphs(model, max_batch=4)


def run_segments(program, model, attention_outputs):
    """q/k/v after each segment (float32 on the host) and the logits, feeding the given o's in turn."""
    outputs = [tuple(t.float().cpu() for t in program.first())]
    for layer in range(model.num_layers - 1):
        outputs.append(tuple(t.float().cpu() for t in program.middle(layer, attention_outputs[layer])))
    return outputs, program.last(attention_outputs[-1]).float().cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_rows", [3, 4])
def test_graph_segments_equal_eager_segments_cuda(num_rows):
    model, _ = load_model("random:tiny", dtype="bfloat16", device="cuda", seed=0)
    cfg = model.config
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (num_rows,), device="cuda", generator=gen)
    positions = torch.randint(0, 64, (num_rows,), device="cuda", generator=gen)
    outputs = [torch.randn(num_rows, cfg.num_heads, cfg.head_dim, device="cuda", generator=gen).to(model.dtype)
               for _ in range(model.num_layers)]
    graphs = LayerGraphs(model, max_batch=8)
    with torch.inference_mode():
        eager = run_segments(EagerDense(model, tokens, positions), model, outputs)
        graphed = run_segments(GraphDense(graphs, graphs.segments(0, num_rows), tokens, positions), model, outputs)
        # another lane's run in between leaves lane 0's buffers alone
        other = GraphDense(graphs, graphs.segments(1, num_rows), tokens.flip(0), positions.flip(0))
        other.first()
        again = run_segments(GraphDense(graphs, graphs.segments(0, num_rows), tokens, positions), model, outputs)
    assert graphs.num_replays == 2 * (model.num_layers + 1) + 1
    for run in (graphed, again):
        for got, expected in zip(run[0], eager[0]):
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=0, rtol=0)
        torch.testing.assert_close(run[1], eager[1], atol=0, rtol=0)
    assert graphs.segments(0, 9) is None  # past the largest bucket: the caller runs eagerly
