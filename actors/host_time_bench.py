"""The Executor's host time per decode step, outside the model forward, on the CPU.

    python -m fastdecode.actors.host_time_bench --json [--model tiny] [--layers 2] [--batches 1,64]
        [--node gpu-kv|local] [--repeats 3] [--profile]

Runs the real Executor (scheduler, mini-batch build, step model, sampling, events,
streams) over a small model on the CPU, with the whole step in one call on the dense
thread: ``gpu-kv`` (default) is the GPU KV node through ``StepGraphs`` run eagerly
(the path a CUDA graph replays on the GPU), ``local`` the LocalKVNode's per-layer
path. Every request decodes exactly ``--output-len`` tokens. Only steps after every
request's prefill count. ``--layers`` sets the random model's depth: 2 (the default)
keeps the CPU forward short, so its GIL slices barely contend with the event loop
(as a GPU replay would not); 32 adds the per-layer work of a Llama-3-8B step to the
scheduler's share. The forward (from the step's embedding to its logits) is
timed inside the model; ``host_us_per_step`` is the step's wall time minus it: what
the GPU would wait for between two replays. ``host_cpu_us_per_step`` is the same in
CPU time (all threads, less the forwards'). It splits into the event loop's own work
(``loop_us_per_step``: the step's wall time outside its calls on the dense thread) and
the dense calls' time outside the forward (``dense_calls_host_us_per_step``: thread
hops, staging, sampling). ``--profile`` prints the heaviest
functions of the measured steps on the event-loop thread (cProfile, by own time) on stderr.
Prints one JSON object last on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import sys
import time


class TimedModel:
    """A model whose forward passes are timed: from ``embed`` to the end of ``logits``."""

    def __init__(self, model) -> None:
        self._model = model
        self.forward_s = 0.0
        self.forward_cpu_s = 0.0  # CPU time of the forwards' thread (robust to other load on the machine)
        self._start = self._start_cpu = 0.0
        self.dense_wait_s = 0.0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed(self, token_ids):
        self._start, self._start_cpu = time.perf_counter(), time.thread_time()
        return self._model.embed(token_ids)

    def logits(self, x):
        out = self._model.logits(x)
        self.forward_s += time.perf_counter() - self._start
        self.forward_cpu_s += time.thread_time() - self._start_cpu
        return out

        self.dense_wait_s = 0.0  # the event loop's waits for calls on the dense thread

    def clocks(self, num_steps: int) -> tuple[float, ...]:
        return (time.perf_counter(), time.process_time(), num_steps, self.forward_s, self.forward_cpu_s,
                self.dense_wait_s)

    def time_dense_calls(self, runner) -> None:
        """Count the event loop's waits for ``runner.run`` calls (the rest of a step is its own work)."""
        run = runner.run

        async def timed_run(fn, *args):
            start = time.perf_counter()
            try:
                return await run(fn, *args)
            finally:
                self.dense_wait_s += time.perf_counter() - start

        runner.run = timed_run


def random_model(preset: str, *, num_layers: int, seed: int):
    """A random float32 model of a preset's shapes with ``num_layers`` layers, on the CPU."""
    import dataclasses

    import torch

    from fastdecode.actors.model.llama import LlamaModel
    from fastdecode.actors.model.presets import preset_config
    from fastdecode.actors.model.weights import init_random_weights

    config = dataclasses.replace(preset_config(preset), num_layers=num_layers)
    model = LlamaModel(config, dtype=torch.float32, device=torch.device("cpu"))
    init_random_weights(model, seed)
    return model


async def measure(model, batch: int, *, node_kind: str, prompt_len: int, output_len: int, seed: int,
                  profiler: cProfile.Profile | None) -> dict:
    from fastdecode.actors.cuda_graphs import StepGraphs
    from fastdecode.actors.executor import Executor, ExecutorConfig
    from fastdecode.actors.gpu_kv import GpuKVConfig, GpuKVNode, gpu_kv_bytes
    from fastdecode.actors.kv_nodes import LocalKVNode
    from fastdecode.actors.request import SamplingParams
    from fastdecode.scheduler import SchedulerConfig

    cfg = model.config
    final_len = prompt_len + output_len
    kv_bytes = batch * final_len * cfg.kv_bytes_per_token(model.dtype.itemsize)
    timed = TimedModel(model)
    if node_kind == "gpu-kv":
        node = GpuKVNode.for_model("gpu-kv", model, GpuKVConfig(memory_bytes=gpu_kv_bytes(model, batch, final_len),
                                                                 slot_len=final_len, is_calibrating=False))
    else:
        node = LocalKVNode.for_model("local", model, kv_bytes)
    config = ExecutorConfig(max_model_len=final_len, is_pipelined=False,
                            scheduler=SchedulerConfig(max_num_seqs=batch, admission="all-at-once"))
    executor = Executor(timed, [node], config, eos_token_ids=())
    timed.time_dense_calls(executor.runner)
    if node_kind == "gpu-kv":
        executor.decoder.graphs = StepGraphs(timed, node, max_batch=batch, is_graphed=False)
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    started = asyncio.Event()
    num_started = 0
    marks: dict[str, tuple[float, ...]] = {}

    async def one() -> int:
        nonlocal num_started
        count = 0
        async for event in executor.submit([rng.randrange(cfg.vocab_size) for _ in range(prompt_len)], params):
            if event.error:
                raise RuntimeError(event.error)
            count += 1
            if count == 1:
                num_started += 1
                if num_started == batch:  # every prefill done: decode steps only from here
                    marks["start"] = timed.clocks(executor.num_steps)
                    if profiler is not None:
                        profiler.enable()
                    started.set()
        return count

    await executor.start()
    try:
        counts = await asyncio.gather(*(one() for _ in range(batch)))
        if profiler is not None:
            profiler.disable()
        end = timed.clocks(executor.num_steps)
    finally:
        await executor.stop()
    if counts != [output_len] * batch:
        raise RuntimeError(f"expected {output_len} tokens per request, got {sorted(set(counts))}")
    wall_s, cpu_s, num_steps, forward_s, forward_cpu_s, dense_s = (b - a for a, b in zip(marks["start"], end))
    us = 1e6 / num_steps
    return {"batch": batch, "num_steps": num_steps, "step_us": wall_s * us, "forward_us": forward_s * us,
            "host_us_per_step": (wall_s - forward_s) * us, "host_cpu_us_per_step": (cpu_s - forward_cpu_s) * us,
            "loop_us_per_step": (wall_s - dense_s) * us, "dense_calls_host_us_per_step": (dense_s - forward_s) * us}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a random preset's shapes")
    parser.add_argument("--layers", type=int, default=2,
                        help="layers of the random model (the scheduler's per-step work grows with them)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--node", choices=("gpu-kv", "local"), default="gpu-kv")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch; the lowest host CPU time is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile of the measured steps on stderr")
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model = random_model(args.model, num_layers=args.layers, seed=args.seed)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        runs = []
        for repeat in range(args.repeats):
            profiler = cProfile.Profile() if args.profile and repeat == 0 else None
            runs.append(asyncio.run(measure(model, batch, node_kind=args.node, prompt_len=args.prompt_len,
                                            output_len=args.output_len, seed=args.seed, profiler=profiler)))
            if profiler is not None:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
                print(f"--- batch {batch} ---\n{text.getvalue()}", file=sys.stderr)
        best = min(runs, key=lambda r: r["host_cpu_us_per_step"])
        rows.append(best)
        if not args.json:
            print(f"batch {batch}: step {best['step_us']:.0f} us, forward {best['forward_us']:.0f} us, "
                  f"host {best['host_us_per_step']:.0f} us per step ({best['host_cpu_us_per_step']:.0f} us CPU; "
                  f"event loop {best['loop_us_per_step']:.0f}, dense calls {best['dense_calls_host_us_per_step']:.0f})",
                  file=sys.stderr)
    print(json.dumps({"model": args.model, "node": args.node, "threads": args.threads,
                      "load_1min": os.getloadavg()[0], "rows": rows}))


if __name__ == "__main__":
    main()
