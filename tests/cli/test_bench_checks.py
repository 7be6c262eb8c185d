"""Checks the bench commands make before any work: roofline's CUDA, offline's --gpu-kv-memory."""
from __future__ import annotations

import asyncio

import pytest
import torch
from click.testing import CliRunner

from fastdecode.actors import gpu_kv
from fastdecode.cli import bench_roofline
from fastdecode.cli.bench import bench
from one_line_errors import assert_one_line_error

TINY = ["--model", "random:tiny", "--dtype", "float32", "--device", "cpu"]


def no_work(*args, **kwargs):
    raise AssertionError("the benchmark ran")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host without CUDA")
def test_roofline_without_cuda_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_roofline, "run_roofline", no_work)
    result = CliRunner().invoke(bench, ["roofline", "--out", str(tmp_path / "roof")])
    assert_one_line_error(result, "bench roofline needs a CUDA GPU")
    assert not (tmp_path / "roof").exists()


def test_roofline_on_a_cpu_device_is_one_line_error(monkeypatch):
    monkeypatch.setattr(bench_roofline, "run_roofline", no_work)
    result = CliRunner().invoke(bench, ["roofline", "--device", "cpu"])
    assert_one_line_error(result, "--device must be cuda")
    # another GPU is chosen as vLLM does (the engine refuses cuda:1, after the bandwidth run had been measured)
    result = CliRunner().invoke(bench, ["roofline", "--device", "cuda:1"])
    assert_one_line_error(result, "CUDA_VISIBLE_DEVICES=1 with --device cuda")


def test_gpu_kv_memory_past_the_free_memory_is_refused_before_any_work(monkeypatch):
    from fastdecode.cli import bench as bench_module

    monkeypatch.setattr(bench_module, "run_offline", no_work)
    result = CliRunner().invoke(bench, ["offline", *TINY, "--mode", "gpu-only", "--gpu-kv-memory", "1048576GiB",
                                        "--batch", "4", "--prompt-len", "32", "--output-len", "8"])
    assert_one_line_error(result, "--gpu-kv-memory: GPU KV memory of 1048576.00 GiB is more than this host has")


def test_gpu_kv_memory_gone_once_the_model_is_loaded_is_one_line_error(monkeypatch):
    """The early check passes, then the pool's own check (model loaded) fails: still one line, no allocation."""
    answers = iter([1 << 40])  # free memory: plenty at first, none after

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(gpu_kv, "free_memory_bytes", lambda device: next(answers, 0))
    result = CliRunner().invoke(bench, ["offline", *TINY, "--mode", "gpu-only", "--gpu-kv-memory", "2MiB",
                                        "--batch", "2", "--prompt-len", "4", "--output-len", "2"])
    assert_one_line_error(result, "--gpu-kv-memory: GPU KV memory of 2.0 MiB is more than this host has available "
                                  "(0.0 MiB)")


@pytest.mark.parametrize("preset, architecture", [("tiny", "LlamaForCausalLM"), ("tiny-qwen3", "Qwen3ForCausalLM")])
def test_the_transformers_baseline_is_the_presets_own_architecture(preset, architecture):
    """roofline's transformers baseline was a Llama of the same sizes for every preset: without Qwen3's q/k norms
    (or Qwen2's biases) it did less work than the model it stood for."""
    pytest.importorskip("transformers")
    from fastdecode.actors.model.presets import PRESETS

    model = bench_roofline.transformers_model(PRESETS[preset])
    assert type(model).__name__ == architecture
    ours = PRESETS[preset].num_params
    assert sum(p.numel() for p in model.parameters()) == ours


def test_a_configuration_the_engine_refuses_is_one_line_error():
    """A length past the model's context (offline asks prompt + output of it) used to end in a traceback."""
    result = CliRunner().invoke(bench, ["offline", *TINY, "--shards", "0", "--batch", "1", "--prompt-len", "4096",
                                        "--output-len", "8"])
    assert_one_line_error(result, "max_model_len")
    result = CliRunner().invoke(bench, ["offline", *TINY, "--mode", "shards", "--shards", "0"])
    assert_one_line_error(result, "shards mode needs shards")


def test_roofline_without_transformers_says_so_before_the_sweep(monkeypatch):
    """The transformers comparison runs after the whole GPU sweep: without transformers it used to end there, in a
    traceback, with the sweep's JSON lost."""
    import importlib.util

    monkeypatch.setattr(bench_roofline, "require_cuda", lambda device: None)
    monkeypatch.setattr(bench_roofline, "run_roofline", no_work)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers"
                        else real_find_spec(name, *a))
    assert_one_line_error(CliRunner().invoke(bench, ["roofline"]), "transformers, which is not installed")
    monkeypatch.setattr(bench_roofline, "run_roofline", lambda options: asyncio.sleep(0, {"rows": []}))
    assert CliRunner().invoke(bench, ["roofline", "--transformers-batches", ""]).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--batches", "1,x"], "--batches must be comma-separated positive integers, got '1,x'"),
    (["--batches", "0,4"], "--batches must be comma-separated positive integers, got '0,4'"),
    (["--transformers-batches", "16,y"], "--transformers-batches must be comma-separated positive integers"),
    (["--static-attention", "sdpa,flash"], "--static-attention: 'flash' is not one of sdpa, matmul, compiled, "
                                           "flex, triton, auto"),
])
def test_roofline_options_are_checked_before_any_work(monkeypatch, args, message):
    """--batches and --transformers-batches were parsed, and --static-attention checked, after the bandwidth
    measurement and the model load (the transformers list after the whole sweep): checked first now, before even
    the CUDA check, so no GPU is needed to see it."""
    monkeypatch.setattr(bench_roofline, "run_roofline", no_work)
    monkeypatch.setattr(bench_roofline, "require_cuda", no_work)
    assert_one_line_error(CliRunner().invoke(bench, ["roofline", *args]), message)


def test_roofline_passes_the_parsed_lists_on(monkeypatch):
    seen = {}

    async def record(options):
        seen.update(options)
        return {"rows": []}

    monkeypatch.setattr(bench_roofline, "require_cuda", lambda device: None)
    monkeypatch.setattr(bench_roofline, "run_roofline", record)
    result = CliRunner().invoke(bench, ["roofline", "--batches", "1, 8", "--transformers-batches", "",
                                        "--static-attention", "sdpa,matmul"])
    assert result.exit_code == 0, result.output
    assert (seen["batches"], seen["transformers_batches"], seen["static_attention"]) == ([1, 8], [], ["sdpa", "matmul"])
