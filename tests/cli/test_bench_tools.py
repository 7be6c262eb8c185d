"""fdctl bench offline --sweep-batch, bench project, bench scaling and bench serve on random:tiny (CPU)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fastdecode.cli.bench import bench

sys.path.insert(0, str(Path(__file__).parents[1] / "actors" / "frontend"))
from live_server import TINY_ARGS, LiveServer  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TINY = ["--model", "random:tiny", "--dtype", "float32", "--device", "cpu"]


def run_cli(args: list[str]) -> dict:
    result = CliRunner().invoke(bench, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_png(path: str) -> None:
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_offline_sweep_rows_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run_cli(["offline", *TINY, "--mode", "gpu-only", "--gpu-kv-memory", "1MiB", "--prompt-len", "6",
                   "--output-len", "4", "--sweep-batch", "1,3", "--out", str(tmp_path)])
    assert [row["batch"] for row in out["rows"]] == [1, 3]
    for row in out["rows"]:
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
        assert row["predicted_step_ms"] > 0
        assert row["prediction_error"] == pytest.approx(row["predicted_step_ms"] / row["step_ms"] - 1)
    assert_png(str(tmp_path / "throughput-vs-batch.png"))


def test_sweep_rejects_bad_list():
    result = CliRunner().invoke(bench, ["offline", *TINY, "--sweep-batch", "4,x"])
    assert result.exit_code == 2 and "--sweep-batch must be" in result.output


def test_project_more_hosts_never_fewer_tokens(tmp_path):
    out = run_cli(["project", "--model", "llama3-8b", "--per-host-gbps", "20", "--max-hosts", "6",
                   "--prompt-len", "512", "--output-len", "128", "--out", str(tmp_path), "--json"])
    rows = out["rows"]
    assert [r["hosts"] for r in rows] == list(range(1, 7))
    assert all(r["hosts_used"] <= r["hosts"] for r in rows)
    tokens = [r["tokens_per_s"] for r in rows]
    assert tokens == sorted(tokens) and tokens[-1] > tokens[0]  # shard-bound at 1 host of 20 GB/s
    gpu_only = out["gpu_only"]
    assert gpu_only["batch"] > 0 and gpu_only["tokens_per_s"] > 0
    assert rows[-1]["speedup_vs_gpu_only"] == pytest.approx(tokens[-1] / gpu_only["tokens_per_s"])
    assert_png(str(tmp_path / "projection.png"))


def test_project_model_too_big_is_one_line_error():
    result = CliRunner().invoke(bench, ["project", "--model", "llama3-70b", "--gpu", "a10", "--per-host-gbps", "20",
                                        "--prompt-len", "8", "--output-len", "8"])
    assert result.exit_code == 2 and "do not fit" in result.output


@pytest.mark.slow
def test_scaling_against_shard_processes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run_cli(["scaling", *TINY, "--threads-per-shard", "1", "--shards", "1,2", "--kv-memory", "32MiB",
                   "--batch", "4", "--prompt-len", "6", "--output-len", "4", "--read-bytes", str(16 << 20)])
    assert [r["shards"] for r in out["rows"]] == [1, 2]
    for row in out["rows"]:
        assert row["threads"] == row["shards"]
        assert 1 <= len(row["node_busy_fraction"]) <= row["shards"]
        assert row["kv_gb_read"] > 0 and row["node_gbps"] > 0 and row["total_gbps"] > 0
        assert 1 <= row["num_busy_nodes"] == len(row["node_busy_fraction"]) <= row["shards"]
        assert row["attention_gbps"] == pytest.approx(row["num_busy_nodes"] * row["node_gbps"])  # idle ones aside
        assert row["read_gbps"] > 0 and row["efficiency"] == pytest.approx(row["attention_gbps"] / row["read_gbps"])
    assert out["rows"][0]["scaling_vs_first"] == 1.0


def test_scaling_counts_only_the_nodes_that_attended():
    from fastdecode.cli.bench_scaling import attention_figures

    run = {"prompt_len": 6, "output_len": 4, "num_step_tokens": 100, "kv_bytes_per_token": 1000, "trace_wall_s": 2.0}
    kv_bytes = 100 * 8 * 1000
    one_busy = attention_figures({**run, "node_busy_s": {"a": 0.5}})  # 2 shards, all sequences on one
    assert one_busy["num_busy_nodes"] == 1
    assert one_busy["node_gbps"] == one_busy["attention_gbps"] == pytest.approx(kv_bytes / 0.5 / 1e9)
    both = attention_figures({**run, "node_busy_s": {"a": 0.5, "b": 0.3, "c": 0.0}})
    assert both["num_busy_nodes"] == 2
    assert both["attention_gbps"] == pytest.approx(2 * kv_bytes / 0.8 / 1e9)
    assert both["total_gbps"] == pytest.approx(kv_bytes / 2.0 / 1e9)
    idle = attention_figures({**run, "node_busy_s": {}})
    assert (idle["num_busy_nodes"], idle["node_gbps"], idle["attention_gbps"]) == (0, None, None)


@pytest.fixture(scope="module")
def live_url():
    with LiveServer(*TINY_ARGS, "--kv-memory", "64MiB") as server:
        yield server.url


@pytest.mark.slow
def test_serve_poisson_against_live_server(live_url, tmp_path):
    out = run_cli(["serve", "--url", live_url, "--rate", "20", "--num-requests", "6", "--prompt-len", "5",
                   "--output-len", "4", "--vocab", "50", "--out", str(tmp_path)])
    assert out["num_ok"] == 6 and out["num_errors"] == 0
    assert out["tokens_per_s"] == pytest.approx(6 * 4 / out["wall_s"])
    assert 0 < out["ttft_s"]["p50"] <= out["ttft_s"]["p99"] and out["tpot_s"]["p50"] > 0
    assert_png(str(tmp_path / "latency.png"))


def test_serve_trace_csv_and_errors(live_url, tmp_path):
    trace = tmp_path / "burst.csv"
    trace.write_text("Timestamp,Model,Request tokens,Response tokens\n10.0,x,3,2\n10.2,x,4,3\n")
    out = run_cli(["serve", "--url", live_url, "--trace", str(trace), "--vocab", "50", "--num-requests", "5"])
    assert out["num_requests"] == 2 and out["num_ok"] == 2 and out["tokens_per_s"] == pytest.approx(5 / out["wall_s"])
    bad = tmp_path / "bad.csv"
    bad.write_text("time,tokens\n1,2\n")
    result = CliRunner().invoke(bench, ["serve", "--url", live_url, "--trace", str(bad)])
    assert result.exit_code == 2 and "lacks column" in result.output
