"""``fdctl bench roofline``: the gpu-only decode step against the HBM roofline, and against transformers.

In one process: the device-to-device copy bandwidth of a large buffer (bytes read
plus written), then for each batch size the gpu-only decode step (one model load,
one GPU KV node; the step is the median time per output token once the whole
batch decodes), and ``roofline_ms = (weight bytes read + KV bytes read) /
bandwidth``. Weight bytes read are every parameter but the embedding table (of
which a step reads B rows); KV bytes read are the batch's mean context in all
layers. The step runs as one CUDA graph replay per token (``cuda_graphs.StepGraphs``), its dense
segments compiled by torch.compile unless ``--compile off`` (``both`` measures each);
``--compare-eager`` adds the per-layer eager path. Optionally ``transformers``
``generate`` with a static cache on the same random weights shape and batch (eager,
or ``--transformers-compile``): time per step from two generate lengths.
Prints one JSON object last on stdout.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import statistics
import time

import click

from fastdecode.cli.bench_plot import parse_int_list
from fastdecode.cli.errors import OneLineCommand, OneLineError, one_line_errors


def copy_bandwidth_gbps(device, num_bytes: int = 2 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written, best of ``repeats``."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * num_bytes / best / 1e9


async def decode_batch(executor, batch: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> dict:
    """Run ``batch`` random prompts to exactly ``output_len`` tokens; TTFT and per-token times."""
    from fastdecode.actors.request import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    ttft: list[float] = []
    arrivals: list[list[float]] = []

    async def one() -> None:
        start = time.perf_counter()
        times: list[float] = []
        async for event in executor.submit([rng.randrange(vocab) for _ in range(prompt_len)], params):
            if event.error:
                raise RuntimeError(event.error)
            times.append(time.perf_counter())
        ttft.append(times[0] - start)
        arrivals.append(times)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(batch)))
    # Decode steps only: the other requests' prefills fall between a request's first tokens,
    # so each request's per-token time counts only tokens after every request had its first.
    all_started = max(times[0] for times in arrivals)
    tpot = []
    for times in arrivals:
        steady = [t for t in times if t > all_started]
        if len(steady) > 1:
            tpot.append((steady[-1] - steady[0]) / (len(steady) - 1))
    return {"wall_s": time.perf_counter() - start, "ttft_s": ttft, "tpot_s": tpot}


async def gpu_only_steps(model, batches, prompt_len: int, output_len: int, *, is_graphs: bool, seed: int,
                         static_attention: str = "auto", is_launching_ahead: bool = True, repeats: int = 1) -> list:
    """Per batch: the median per-token time of ``batch`` requests decoding ``output_len`` tokens, the best
    of ``repeats`` runs (each run's figure kept in ``step_ms_runs``)."""
    from fastdecode.actors.cuda_graphs import StepGraphs
    from fastdecode.actors.executor import Executor, ExecutorConfig
    from fastdecode.actors.gpu_kv import GpuKVConfig, GpuKVNode, gpu_kv_bytes
    from fastdecode.scheduler import SchedulerConfig

    cfg = model.config
    final_len = prompt_len + output_len
    node = GpuKVNode.for_model("gpu-kv", model, GpuKVConfig(memory_bytes=gpu_kv_bytes(model, max(batches), final_len),
                                                             slot_len=final_len,
                                                             static_attention=static_attention))
    graphs = StepGraphs(model, node, max_batch=max(batches)) if is_graphs else None
    rows = []
    for batch in batches:
        config = ExecutorConfig(max_model_len=final_len, is_pipelined=False, is_launching_ahead=is_launching_ahead,
                                scheduler=SchedulerConfig(max_num_seqs=batch, admission="all-at-once"))
        executor = Executor(model, [node], config, eos_token_ids=())
        executor.decoder.graphs = graphs
        await executor.start()
        try:
            await decode_batch(executor, batch, prompt_len, 4, cfg.vocab_size, seed)  # warm-up, graph capture
            runs = [await decode_batch(executor, batch, prompt_len, output_len, cfg.vocab_size, seed)
                    for _ in range(repeats)]
        finally:
            await executor.stop()
        steps_ms = [statistics.median(run["tpot_s"]) * 1e3 for run in runs]
        best = runs[steps_ms.index(min(steps_ms))]
        rows.append({"batch": batch, "step_ms": min(steps_ms), "step_ms_runs": steps_ms,
                     "tokens_per_s": batch * output_len / best["wall_s"],
                     "graph_fallbacks": graphs.num_fallbacks if graphs is not None else None,
                     "steps_launched_ahead": graphs.num_ahead_taken if graphs is not None else None})
    return rows


def weight_bytes_read(model, batch: int) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head_weight is not None:  # the embedding table is read B rows at a time
        total -= model.embed_weight.numel() * model.embed_weight.element_size()
        total += batch * model.config.hidden_size * model.embed_weight.element_size()
    return total


def transformers_model(cfg):
    """transformers' own model of ``cfg``'s architecture (Qwen2's biases, Qwen3's q/k norms: a Llama of the same
    sizes would leave them out of the baseline), random weights in the default dtype and device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.model_type, **fields))


def transformers_step_ms(cfg, batch: int, prompt_len: int, output_len: int, device, *, is_compiled: bool) -> float:
    """transformers ``generate`` with a static cache: (t(1 + N) - t(1)) / N per step. Both lengths
    run once untimed first, so a compiled forward (``is_compiled``) compiles outside the timed calls."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers_model(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)

    def timed(new_tokens: int) -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                                 pad_token_id=0, disable_compile=not is_compiled)
        torch.cuda.synchronize(device)
        assert out.shape[1] == prompt_len + new_tokens
        return time.perf_counter() - t0

    timed(1)  # warm-up (and compilation) at both lengths
    timed(1 + output_len)
    step = (min(timed(1 + output_len) for _ in range(2)) - min(timed(1) for _ in range(2))) / output_len
    del model
    torch.cuda.empty_cache()
    return step * 1e3


def render_roofline(result: dict, out_path: str) -> None:
    """Step time against batch size: each measured series and the roofline (PNG); PlotUnavailableError without
    matplotlib."""
    from fastdecode.cli.bench_plot import headless_pyplot

    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in result["rows"]:
        label = f"graph, {row.get('static_attention') or 'sdpa'}" if row["cuda_graphs"] else "eager, per layer"
        label += ", compiled" if row.get("compiled") else ""
        label += ", launched ahead" if row.get("launch_ahead") else ""
        series.setdefault(label, []).append((row["batch"], row["step_ms"]))
    roof = sorted({(r["batch"], r["roofline_ms"]) for r in result["rows"]})
    ax.plot(*zip(*roof), "k--", label="roofline")
    ax.plot([b for b, _ in roof], [1.3 * t for _, t in roof], "k:", label="1.3 × roofline")
    for label, points in series.items():
        ax.plot(*zip(*sorted(points)), "o-", label=label)
    for row in result.get("transformers", []):
        ax.plot([row["batch"]], [row["hf_step_ms"]], "s", color="tab:red",
                label="transformers static cache" + (" (compiled)" if row.get("compiled") else ""))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoding)")
    ax.set_ylabel("decode step, ms")
    ax.set_title(f"gpu-only decode step, {result['model']}, context {result['prompt_len']}+, {result['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def parse_static_attentions(text: str) -> list[str]:
    """``--static-attention``'s comma-separated kernels; OneLineError naming one that is not a kernel."""
    from fastdecode.actors.static_attention import STATIC_ATTENTIONS

    kinds = [kind.strip() for kind in text.split(",")]
    for kind in kinds:
        if kind not in STATIC_ATTENTIONS:
            raise OneLineError(f"--static-attention: {kind!r} is not one of {', '.join(STATIC_ATTENTIONS)}")
    return kinds


def require_cuda(device: str) -> None:
    """OneLineError unless ``device`` names a CUDA device that torch can use: checked before any work."""
    import torch

    if device not in ("cuda", "cuda:0"):
        hint = (f"give the GPU as vLLM does, CUDA_VISIBLE_DEVICES={device[5:]} with --device cuda"
                if device.startswith("cuda:") else "--device must be cuda")
        raise OneLineError(f"bench roofline measures a CUDA GPU: {hint}, got {device!r}")
    if not torch.cuda.is_available():
        raise OneLineError("bench roofline needs a CUDA GPU, and torch sees none here (a CPU-only build or no driver)")


async def run_roofline(options: dict) -> dict:
    import torch

    from fastdecode.actors.model import load_model

    device = torch.device(options["device"])
    bandwidth = copy_bandwidth_gbps(device)
    model, _ = await asyncio.to_thread(load_model, options["model"], dtype=options["dtype"], device=str(device),
                                       seed=options["seed"])
    batches = options["batches"]
    prompt_len, output_len = options["prompt_len"], options["output_len"]
    mean_context = prompt_len + output_len / 2
    kv_token = model.config.kv_bytes_per_token(model.dtype.itemsize)
    result = {"model": options["model"], "device": torch.cuda.get_device_name(device), "hbm_copy_gbps": bandwidth,
              "prompt_len": prompt_len, "output_len": output_len, "rows": []}
    compiled = {"on": [True], "off": [False], "both": [True, False]}[options["compile"]]
    aheads = {"on": [True], "off": [False], "both": [True, False]}[options["launch_ahead"]]
    runs = [(True, kind, is_compiled, is_ahead) for is_compiled in compiled
            for kind in options["static_attention"] for is_ahead in aheads]
    if options["compare_eager"]:
        runs.append((False, "sdpa", compiled[0], False))
    for is_graphs, static_attention, is_compiled, is_ahead in runs:
        model.compile_dense(is_compiled)
        rows = await gpu_only_steps(model, batches, prompt_len, output_len, is_graphs=is_graphs,
                                    seed=options["seed"], static_attention=static_attention,
                                    is_launching_ahead=is_ahead, repeats=options["repeats"])
        for row in rows:
            row["static_attention"] = static_attention if is_graphs else None
            row["compiled"] = is_compiled
            row["launch_ahead"] = is_ahead
            read = weight_bytes_read(model, row["batch"]) + row["batch"] * mean_context * kv_token
            row["roofline_ms"] = read / (bandwidth * 1e9) * 1e3
            row["ratio"] = row["step_ms"] / row["roofline_ms"]
            row["cuda_graphs"] = is_graphs
        result["rows"].extend(rows)
        click.echo(json.dumps(rows), err=True)
    cfg = model.config
    del model
    torch.cuda.empty_cache()
    if options["transformers_batches"]:
        ours: dict[int, float] = {}  # the best graphed step at each batch
        for r in result["rows"]:
            if r["cuda_graphs"]:
                ours[r["batch"]] = min(ours.get(r["batch"], float("inf")), r["step_ms"])
        result["transformers"] = []
        for batch in options["transformers_batches"]:
            step = transformers_step_ms(cfg, batch, prompt_len, output_len, device,
                                        is_compiled=options["transformers_compile"])
            result["transformers"].append({"batch": batch, "hf_step_ms": step, "ours_step_ms": ours.get(batch),
                                           "compiled": options["transformers_compile"],
                                           "speedup": step / ours[batch] if batch in ours else None})
            click.echo(json.dumps(result["transformers"][-1]), err=True)
    return result


@click.command("roofline", cls=OneLineCommand)
@click.option("--model", default="random:llama3-8b", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--batches", default="1,2,4,8,16,32,64", show_default=True)
@click.option("--prompt-len", default=512, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=32, show_default=True, type=click.IntRange(2))
@click.option("--transformers-batches", default="16,64", show_default=True, help="'' to skip the comparison.")
@click.option("--static-attention", default="auto", show_default=True,
              help="Graphed attention kernel(s), comma-separated: sdpa, matmul, compiled, flex, triton, auto (each "
                   "measured in turn).")
@click.option("--launch-ahead", default="on", show_default=True, type=click.Choice(["on", "off", "both"]),
              help="Launch each step with the previous step's tokens on the device before the host reads them.")
@click.option("--transformers-compile/--no-transformers-compile", default=False, show_default=True,
              help="Let transformers torch.compile its static-cache forward (compiled in the untimed warm-up).")
@click.option("--compile", "compile", default="on", show_default=True, type=click.Choice(["on", "off", "both"]),
              help="The per-layer dense segments through torch.compile: on, off, or both measured in turn.")
@click.option("--compare-eager/--no-compare-eager", default=False, show_default=True,
              help="Also measure without CUDA graphs.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Decode runs per batch size; the step time is the best run's (like the copy bandwidth's).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None, help="Folder for roofline.png (step time against batch).")
def roofline(**options) -> None:
    """The gpu-only decode step against the HBM roofline (CUDA only)."""
    try:  # before any work (the bandwidth measurement, the model load, the sweep)
        options["batches"] = parse_int_list(options["batches"], "--batches")
        text = options["transformers_batches"]
        options["transformers_batches"] = parse_int_list(text, "--transformers-batches") if text.strip() else []
    except ValueError as exc:
        raise OneLineError(str(exc)) from None
    options["static_attention"] = parse_static_attentions(options["static_attention"])
    require_cuda(options["device"])
    if options["transformers_batches"] and importlib.util.find_spec("transformers") is None:
        # known before the sweep, not after it (the comparison runs last)
        raise OneLineError("--transformers-batches compares with transformers, which is not installed: install it "
                           "(the [test] extra has it) or give --transformers-batches ''")
    with one_line_errors():
        result = asyncio.run(run_roofline(options))
    click.echo(json.dumps(result))
    if options["out"]:
        from fastdecode.cli.bench_plot import PlotUnavailableError, warn_plot_skipped

        os.makedirs(options["out"], exist_ok=True)
        out_path = os.path.join(options["out"], "roofline.png")
        try:
            render_roofline(result, out_path)
        except PlotUnavailableError as exc:
            warn_plot_skipped(out_path, exc)
