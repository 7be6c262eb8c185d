"""Discrete step simulation of the scheduler: all-at-once admission against SLS.

``python -m fastdecode.scheduler.simulate --json`` runs 1,024 sequences (prompt
128, output 1,024, batch 256) on 4 shards, once per admission mode, through the
real ``Scheduler`` and reports the peak total context and tokens/s of each and
``peak_context_reduction = 1 - peak(sls) / peak(all-at-once)``.  SLS paces only
where attention bounds the step (``SchedulerConfig.sls_attention_margin``), so the
result also gives ``peak_step_ratio``, the predicted step at the all-at-once peak
over the same step with no context, and ``is_sls_pacing``, whether that ratio is
past the margin: where it is not, SLS admits as all-at-once does, and says so.

Default parameters (plausible for the lent H100 host, all overridable):
- model: Llama-3-8B shape in bf16 (32 layers, 8 KV heads of 128: 128 KiB of KV per token);
- GPU: the analytical H100 (3.35e12 B/s HBM at 85 %, 989e12 FLOP/s at 60 %,
  20 us of launches per layer), dense step T(b) from its sweep;
- shards: 4 identical, 60 GB/s read, 100 us per attend call, 64 GiB, 16-token pages;
- prefill: a dense pass over the prompt tokens plus shipping their KV over a
  50 GB/s link.

Each step costs the scheduler's predicted pipelined decode step (every running
sequence gets one token) plus the prefill of the sequences admitted in it.
The simulation is deterministic: every sequence runs to max_tokens.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fastdecode.scheduler.config import SchedulerConfig
from fastdecode.scheduler.gpu_profile import GPU_SPECS, GpuSpec
from fastdecode.scheduler.model_shape import LLAMA3_8B, ModelShape
from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import ShardPerfModel
from fastdecode.scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class SimulationConfig:
    num_seqs: int = 1024
    prompt_len: int = 128
    output_len: int = 1024
    batch_size: int = 256
    num_shards: int = 4
    shard_gbps: float = 60.0
    shard_overhead_s: float = 100e-6
    shard_memory_gib: float = 64.0
    page_size: int = 16
    link_gbps: float = 50.0
    gpu: str = "h100"
    sls_min_group_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_seqs", "prompt_len", "output_len", "batch_size", "num_shards", "page_size", "sls_min_group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("shard_gbps", "shard_memory_gib", "link_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.shard_overhead_s < 0:
            raise ValueError("shard_overhead_s must be >= 0")
        if self.gpu not in GPU_SPECS:
            raise ValueError(f"gpu must be one of {sorted(GPU_SPECS)}, got {self.gpu!r}")


@dataclass(frozen=True)
class ModeResult:
    peak_total_context: int
    mean_total_context: float
    tokens_per_s: float
    num_tokens: int
    num_steps: int
    elapsed_s: float
    peak_step_ms: float
    mean_step_ms: float


def _prefill_s(spec: GpuSpec, shape: ModelShape, num_tokens: int, link_bytes_per_s: float) -> float:
    if num_tokens == 0:
        return 0.0
    return spec.dense_step_s(shape, num_tokens) + num_tokens * shape.kv_bytes_per_token / link_bytes_per_s


def _scheduler(cfg: SimulationConfig, admission: str, shape: ModelShape) -> Scheduler:
    spec = GPU_SPECS[cfg.gpu]
    nodes = [
        NodeModel(
            node_id=i,
            capacity_bytes=int(cfg.shard_memory_gib * (1 << 30)),
            kv_bytes_per_token=shape.kv_bytes_per_token,
            num_layers=shape.num_layers,
            page_size=cfg.page_size,
            perf=ShardPerfModel(cfg.shard_overhead_s, cfg.shard_gbps * 1e9),
        )
        for i in range(cfg.num_shards)
    ]
    sched_cfg = SchedulerConfig(
        max_num_seqs=cfg.batch_size, admission=admission, sls_min_group_size=cfg.sls_min_group_size
    )
    return Scheduler(sched_cfg, nodes, gpu=spec.sweep(shape).perf_model())


def peak_step_ratio(cfg: SimulationConfig, shape: ModelShape = LLAMA3_8B) -> float:
    """Predicted step of a full batch at the all-at-once peak context over the same step with no context."""
    sched = _scheduler(cfg, "sls", shape)
    batch = cfg.batch_size
    return (sched.predict_unplaced_step_s(batch, {None: batch * (cfg.prompt_len + cfg.output_len)})
            / sched.predict_unplaced_step_s(batch, {None: batch}))


def run_mode(cfg: SimulationConfig, admission: str, shape: ModelShape = LLAMA3_8B) -> ModeResult:
    """Simulate every sequence to completion under one admission mode."""
    spec = GPU_SPECS[cfg.gpu]
    sched = _scheduler(cfg, admission, shape)
    for seq_id in range(cfg.num_seqs):
        sched.add_request(seq_id, cfg.prompt_len, cfg.output_len)
    generated: dict[int, int] = {}
    elapsed = peak_step = context_sum = 0.0
    peak_context = num_tokens = num_steps = 0
    while sched.num_waiting or sched.num_running:
        plan = sched.schedule()
        prefill_tokens = sum(a.num_prefill_tokens for a in plan.admitted)
        step_s = plan.predicted_step_s + _prefill_s(spec, shape, prefill_tokens, cfg.link_gbps * 1e9)
        running = plan.minibatches[0] + plan.minibatches[1]
        if not running:
            raise RuntimeError("the scheduler admitted nothing although sequences are waiting")
        elapsed += step_s
        peak_step = max(peak_step, step_s)
        peak_context = max(peak_context, plan.total_context)
        context_sum += plan.total_context
        num_steps += 1
        sched.on_tokens(running)
        num_tokens += len(running)
        for seq_id in running:
            generated[seq_id] = generated.get(seq_id, 0) + 1
            if generated[seq_id] == cfg.output_len:
                sched.on_finished(seq_id)
    return ModeResult(
        peak_total_context=peak_context,
        mean_total_context=context_sum / num_steps,
        tokens_per_s=num_tokens / elapsed,
        num_tokens=num_tokens,
        num_steps=num_steps,
        elapsed_s=elapsed,
        peak_step_ms=peak_step * 1e3,
        mean_step_ms=elapsed / num_steps * 1e3,
    )


def simulate(cfg: SimulationConfig) -> dict:
    """Both modes and their comparison, as a JSON-ready dict."""
    all_at_once = run_mode(cfg, "all-at-once")
    sls = run_mode(cfg, "sls")
    ratio = peak_step_ratio(cfg)
    return {
        "config": asdict(cfg),
        "all_at_once": asdict(all_at_once),
        "sls": asdict(sls),
        "peak_context_reduction": 1.0 - sls.peak_total_context / all_at_once.peak_total_context,
        "tokens_per_s_ratio": sls.tokens_per_s / all_at_once.tokens_per_s,
        "peak_step_ratio": ratio,
        "is_sls_pacing": ratio > 1.0 + SchedulerConfig().sls_attention_margin,
    }


def main(argv: Sequence[str] | None = None) -> int:
    defaults = SimulationConfig()
    parser = argparse.ArgumentParser(prog="python -m fastdecode.scheduler.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    for name in ("num_seqs", "prompt_len", "output_len", "batch_size", "num_shards", "sls_min_group_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("shard_gbps", "shard_memory_gib", "link_gbps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--gpu", choices=sorted(GPU_SPECS), default=defaults.gpu)
    args = parser.parse_args(argv)
    try:
        cfg = SimulationConfig(**{k: v for k, v in vars(args).items() if k != "json"})
    except ValueError as exc:
        parser.error(str(exc))
    result = simulate(cfg)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for mode in ("all_at_once", "sls"):
            r = result[mode]
            print(
                f"{mode:12s} peak context {r['peak_total_context']:>9,d} tokens  "
                f"{r['tokens_per_s']:>9,.0f} tokens/s  step {r['mean_step_ms']:.1f} ms mean, {r['peak_step_ms']:.1f} ms peak"
            )
        print(f"peak context reduction {result['peak_context_reduction']:.1%}, "
              f"tokens/s ratio sls/all-at-once {result['tokens_per_s_ratio']:.3f}")
        bound = "bounds" if result["is_sls_pacing"] else "does not bound"
        verdict = "SLS paces" if result["is_sls_pacing"] else "SLS admits at once"
        print(f"attention {bound} the step: {verdict} (step at the all-at-once peak "
              f"{result['peak_step_ratio']:.2f}x the step with no context)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
