"""``fdctl bench offline --sweep-batch 1,8,16``: the offline benchmark at each batch size in turn.

Each batch runs ``run_offline`` on a fresh cluster (the model is loaded again per
batch: simple and leaves no KV from the previous batch behind). The result has
one row per batch (tokens/s, decode step, the scheduler's predicted step and its
error); with ``--out`` it also writes ``throughput-vs-batch.png``.
"""
from __future__ import annotations

import os
import sys

from fastdecode.cli.bench_plot import line_plots

ROW_KEYS = ("batch", "tokens_per_s", "decode_tokens_per_s", "step_ms", "predicted_step_ms", "prediction_error",
            "gpu_busy_fraction", "node_busy_fraction", "overlap", "ttft_s", "tpot_s", "wall_s")


async def run_sweep(options: dict, batches: list[int]) -> dict:
    from fastdecode.cli.bench import run_offline

    rows = []
    first = None
    for batch in batches:
        print(f"bench sweep: batch {batch}", file=sys.stderr)
        result = await run_offline({**options, "batch": batch})
        first = first or result
        rows.append({key: result.get(key) for key in ROW_KEYS})
    summary = {key: first[key] for key in ("model", "mode", "device", "dtype", "prompt_len", "output_len",
                                            "num_nodes", "pipeline")}
    summary["rows"] = rows
    if options.get("out"):
        summary["plot"] = render_sweep(summary, os.path.join(options["out"], "throughput-vs-batch.png"))
    return summary


def render_sweep(summary: dict, out_path: str) -> str:
    rows = summary["rows"]
    return line_plots(out_path, f"{summary['model']} {summary['mode']} on {summary['device']}, prompt "
                      f"{summary['prompt_len']}, output {summary['output_len']}", [
        {"xlabel": "batch", "ylabel": "tokens/s", "logx": True, "series": {
            "end to end": [(r["batch"], r["tokens_per_s"]) for r in rows],
            "decode (batch / step)": [(r["batch"], r["decode_tokens_per_s"]) for r in rows]}},
        {"xlabel": "batch", "ylabel": "decode step, ms", "logx": True, "series": {
            "measured": [(r["batch"], r["step_ms"]) for r in rows],
            "predicted": [(r["batch"], r["predicted_step_ms"]) for r in rows]}},
    ])
