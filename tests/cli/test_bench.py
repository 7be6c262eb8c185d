"""fdctl bench offline modes on the tiny random model (CPU), and ClusterConfig mode checks."""
from __future__ import annotations

import pytest

from fastdecode.actors.cluster import ClusterConfig
from fastdecode.cli.bench import run_offline


def options(**over) -> dict:
    base = dict(model="random:tiny", seed=0, dtype="float32", device="cpu", batch=3, prompt_len=8, output_len=5,
                shards=0, shard=(), kv_memory=None, pipeline=True, out=None, mode="gpu-only",
                gpu_kv_memory=1 << 20, cuda_graphs=True)
    base.update(over)
    return base


async def test_gpu_only_generates_exactly_output_len(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = await run_offline(options())
    assert result["mode"] == "gpu-only" and result["num_nodes"] == 1
    assert result["pipeline"] is False and result["cuda_graphs"] is False  # CPU: no graphs
    assert result["tokens_per_s"] > 0 and result["step_ms"] > 0
    assert result["tpot_s"]["p50"] > 0


async def test_the_chunked_prefill_limit_reaches_the_executor(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (await run_offline(options(max_num_batched_tokens=4)))["max_num_batched_tokens"] == 4
    assert (await run_offline(options(max_num_batched_tokens=0)))["max_num_batched_tokens"] is None  # off
    assert (await run_offline(options()))["max_num_batched_tokens"] == 256  # the CPU's default


async def test_a_shard_that_attended_nothing_reports_no_rate(monkeypatch):
    """One sequence over two shards: the idle one's rate would be its start-up calibration, not a measurement."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = await run_offline(options(mode="shards", shards=2, kv_memory=16 << 20, batch=1))
    rates = result["node_attn_gbps"]
    assert len(rates) == 2 and set(result["node_busy_s"]) < set(rates)
    assert [rates[node] > 0 for node in result["node_busy_s"]] == [True]
    assert [rate for node, rate in rates.items() if node not in result["node_busy_s"]] == [None]


async def test_hybrid_reports_its_start_up_choice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = await run_offline(options(mode="hybrid", shards=1, kv_memory=64 << 20))  # not a third of the RAM
    choice = result["mode_choice"]
    assert choice["mode"] in ("gpu-only", "hybrid")
    assert choice["prefill_s"] > 0  # the rates it compared count a timed prefill per sequence
    assert result["num_nodes"] == (1 if choice["mode"] == "gpu-only" else 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="gpu-only", num_shards=1), "takes no shards"),
    (dict(mode="hybrid"), "needs shards"),
    (dict(mode="fast"), "mode must be"),
    (dict(mode="gpu-only", gpu_kv_memory_bytes=10), "at least 1 MiB"),
])
def test_mode_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**kwargs)


def test_generation_failing_mid_run_is_one_line_error(monkeypatch):
    """A request that fails after its first token (e.g. its shard died) ends the command with one line, no traceback."""
    from click.testing import CliRunner

    from fastdecode.actors.cluster import Cluster
    from fastdecode.actors.request import TokenEvent
    from fastdecode.cli.bench import bench

    async def failing_stream(self, prompt_ids, params):
        yield TokenEvent(request_id=0, token_id=1, index=0)
        yield TokenEvent(request_id=0, token_id=-1, index=1, finish_reason="error", error="no KV node left",
                         is_retryable=True)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(Cluster, "submit", failing_stream)
    result = CliRunner().invoke(bench, ["offline", "--model", "random:tiny", "--dtype", "float32", "--device", "cpu",
                                        "--mode", "gpu-only", "--gpu-kv-memory", "1MiB", "--batch", "2",
                                        "--prompt-len", "4", "--output-len", "3"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == "Error: generation failed: no KV node left"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("values", [[3.0], [2.0, 1.0], list(range(10, 0, -1)), [0.5 * i * i for i in range(37)],
                                    list(range(100)), list(range(250))])
def test_percentiles_interpolate_between_ranks_as_numpy_does(values):
    """p99 picked the rank above q * n: the maximum of any run of fewer than 100 requests. vLLM reports numpy's
    default, linear interpolation at q * (n - 1)."""
    import numpy as np

    from fastdecode.cli.bench import percentiles

    figures = percentiles(values)
    assert set(figures) == {"p50", "p90", "p99", "mean"}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert figures[name] == pytest.approx(float(np.percentile(values, q)), abs=1e-12), name
    assert figures["mean"] == pytest.approx(float(np.mean(values)))


def test_percentiles_of_one_to_ten():
    from fastdecode.cli.bench import percentiles

    assert percentiles([float(i) for i in range(1, 11)]) == pytest.approx({"p50": 5.5, "p90": 9.1, "p99": 9.91,
                                                                           "mean": 5.5})
    assert percentiles([]) == {}
