"""Start-up warm-up: the compiles and CUDA-graph captures that would otherwise fall on the first requests.

With the dense segments compiled (``LlamaModel.compile_dense``), each compiled function compiles on the
first call of each class of inputs: one row (sizes of 1 are specialised), two or more rows (one symbolic
size), and each layout of the attention output it is given: a prompt's (the prefill attention's), a later
chunk's (attention over its prefix), a decode step's (contiguous rows). On the H100 host with smollm2 those
compiles made the first request after ``fdctl start-gpu`` take 17 s (docs/benchmarks.md, session 12).

``warm_up`` runs the Executor's own dense code over dummy tokens in each of those classes before it serves,
as vLLM compiles and captures before it serves:
- prompts through ``PrefillJob``: one of 1 token, one of 3 in chunks of 2 (a chunk of 2, then 1 after its
  prefix) and one of 4 in chunks of 2 (2 after a prefix of 2);
- the decode step's dense program (``DecodeStep.dense_program``: CUDA-graph segments, else eager) for 1 and
  2 rows, lane 0, the attention outputs as zeros in the layout the step gives them;
- a GPU KV node's whole-step graphs (``StepGraphs.warm_up``) for 1 and 2 rows.
Nothing here touches a KV node: a prefill computes its K/V and drops them, the segments read and write their
own buffers, a whole step's padding rows write only the node's scratch column. Nothing is timed for the
scheduler's models. Other buckets and lanes are captured when first used, with nothing left to compile.
"""
from __future__ import annotations

import logging
import time

import torch

from fastdecode.actors.chunked_prefill import PrefillJob

log = logging.getLogger(__name__)

WARM_ROWS = (1, 2)  # a specialised size of 1, then the symbolic size every larger batch shares
# (prompt length, chunk size) pairs: a whole prompt of 1, then chunks of 2 and 1, then 2 and 2 tokens
WARM_PROMPTS = ((1, 1), (3, 2), (4, 2))


def needs_warm_up(model, decoder) -> bool:
    """Whether anything would compile or capture on first use: compiled dense segments or CUDA graphs."""
    return bool(model.is_dense_compiled or decoder.graphs is not None or decoder.layer_graphs is not None)


def warm_up(model, decoder) -> float:
    """Runs the dense code paths once per class of inputs (see the module docstring); its seconds. On the
    dense thread (``DenseRunner.run``), before the Executor serves."""
    start = time.perf_counter()
    for num_tokens, chunk in WARM_PROMPTS:
        job = PrefillJob(seq=None, node_index=-1, token_ids=[0] * num_tokens, is_resumed=False)
        while job.run_chunk(model, chunk) is None:
            pass
    cfg = model.config
    for rows in WARM_ROWS:
        tokens = torch.zeros(rows, dtype=torch.long, device=model.device)
        program = decoder.dense_program(tokens, tokens, lane=0)
        o = torch.zeros(rows, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=model.device)
        program.first()
        for layer in range(model.num_layers - 1):
            program.middle(layer, o)
        program.last(o)
    if decoder.graphs is not None:
        decoder.graphs.warm_up(WARM_ROWS)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    log.info("warm-up (compiles, CUDA graphs) took %.1f s", seconds)
    return seconds
