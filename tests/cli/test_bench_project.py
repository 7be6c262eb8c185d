"""fdctl bench project's option ranges and GPU profiles, and the profile ``bench offline --write-gpu-profile``
writes (random:tiny on the CPU) driving ``fdctl plan`` and ``bench project``."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fastdecode.cli.bench import bench
from fastdecode.cli.main import main
from fastdecode.scheduler.gpu_profile import GPU_SPECS, GpuProfile
from fastdecode.scheduler.model_shape import LLAMA3_8B
from one_line_errors import assert_one_line_error

pytestmark = pytest.mark.timeout(120)
BASE = ["project", "--model", "llama3-8b", "--per-host-gbps", "20", "--max-hosts", "2", "--prompt-len", "512",
        "--output-len", "128"]


def project(*args: str):
    return CliRunner().invoke(bench, [*BASE, *args])


@pytest.mark.parametrize("args, message", [
    (("--per-host-gbps", "inf"), "Invalid value for '--per-host-gbps': inf is not a finite number."),
    (("--per-host-gbps", "nan"), "Invalid value for '--per-host-gbps': nan is not a finite number."),
    (("--shard-overhead-us", "-5"), "Invalid value for '--shard-overhead-us': -5.0 is not in the range x>=0."),
    (("--shard-overhead-us", "inf"), "Invalid value for '--shard-overhead-us': inf is not a finite number."),
    (("--hbm-gbps", "-5"), "Invalid value for '--hbm-gbps': -5.0 is not in the range x>0."),  # was taken
    (("--hbm-gbps", "0"), "Invalid value for '--hbm-gbps': 0.0 is not in the range x>0."),
    (("--hbm-gbps", "inf"), "Invalid value for '--hbm-gbps': inf is not a finite number."),
])
def test_figures_out_of_range_are_one_line_errors(args, message):
    assert_one_line_error(project(*args), message, is_exact=True)


def test_a_length_past_the_models_context_is_one_line_error():
    result = CliRunner().invoke(bench, ["project", "--model", "random:tiny", "--per-host-gbps", "20", "--prompt-len",
                                        "2048", "--output-len", "1"])
    assert_one_line_error(result, "prompt 2048 + output 1 = 2049 tokens do not fit the model's context of 2048 "
                                  "tokens (max_position_embeddings): a server refuses such requests", is_exact=True)


def write_profile(path, profile: GpuProfile, **drop) -> str:
    data = profile.to_json_dict()
    for key in drop:
        del data[key]
    path.write_text(json.dumps(data))
    return str(path)


def test_a_profile_of_another_depth_is_refused(tmp_path):
    """plan refused a profile measured on a model of another depth; bench project used it."""
    path = write_profile(tmp_path / "p.json", GPU_SPECS["h100"].sweep(LLAMA3_8B, batches=(1, 64, 512)))
    result = CliRunner().invoke(bench, [*BASE[:2], "llama3-70b", *BASE[3:], "--gpu-profile", path])
    assert_one_line_error(result, "the profile was measured on a 32-layer model, llama3-70b has 80", is_exact=True)


def test_a_profile_without_memory_says_the_gpu_memory_is_unknown(tmp_path):
    """No memory_bytes: the gpu-only row said "no sequence's KV fits on the GPU", which nothing showed."""
    path = write_profile(tmp_path / "p.json", GPU_SPECS["h100"].sweep(LLAMA3_8B, batches=(1, 64, 512)),
                         memory_bytes=None)
    result = project("--gpu-profile", path)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["gpu_only"] == {"batch": None, "tokens_per_s": None, "ms_per_token": None,
                               "note": "GPU memory unknown: the profile has no memory_bytes"}
    assert [r["speedup_vs_gpu_only"] for r in out["rows"]] == [None, None]
    assert all(r["tokens_per_s"] > 0 for r in out["rows"])
    assert "gpu-only: GPU memory unknown: the profile has no memory_bytes" in result.stderr
    assert "no sequence's KV fits" not in result.output
    with_memory = json.loads(project("--gpu-profile", write_profile(
        tmp_path / "m.json", GPU_SPECS["h100"].sweep(LLAMA3_8B, batches=(1, 64, 512))), "--json").stdout)
    assert with_memory["gpu_only"]["batch"] > 0 and with_memory["rows"][0]["speedup_vs_gpu_only"] > 0


def test_offline_writes_the_executors_dense_profile(tmp_path, monkeypatch):
    """--gpu-profile's file had nothing that wrote it: bench offline writes the Executor's start-up sweep, which
    plan and bench project then take."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "profiles" / "tiny.json"
    result = CliRunner().invoke(bench, ["offline", "--model", "random:tiny", "--dtype", "float32", "--device", "cpu",
                                        "--mode", "gpu-only", "--gpu-kv-memory", "1MiB", "--batch", "4",
                                        "--prompt-len", "4", "--output-len", "2", "--write-gpu-profile", str(path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["gpu_profile"] == str(path)
    data = json.loads(path.read_text())
    profile = GpuProfile.from_json_dict(data)
    assert [b for b, _ in profile.dense_step_s] == [1, 2, 4]  # the sweep at 1, batch / 2 and batch
    assert all(s > 0 for _, s in profile.dense_step_s)
    assert (profile.model, profile.dtype, profile.num_layers, profile.device_name) == ("random:tiny", "float32", 2,
                                                                                        "cpu")
    assert profile.memory_bytes is None and "memory_bytes" not in data  # a CPU: no GPU memory to report
    planned = CliRunner().invoke(main, ["plan", "--model", "random:tiny", "--gpu-profile", str(path),
                                        "--prompt-len", "64", "--output-len", "64", "--json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.output)["gpu"] == "cpu"
    projected = CliRunner().invoke(bench, ["project", "--model", "random:tiny", "--gpu-profile", str(path),
                                           "--per-host-gbps", "20", "--max-hosts", "1", "--prompt-len", "64",
                                           "--output-len", "64", "--json"])
    assert projected.exit_code == 0, projected.output
    assert json.loads(projected.stdout)["rows"][0]["tokens_per_s"] > 0


def test_write_gpu_profile_takes_one_batch(tmp_path):
    result = CliRunner().invoke(bench, ["offline", "--model", "random:tiny", "--sweep-batch", "1,2",
                                        "--write-gpu-profile", str(tmp_path / "p.json")])
    assert_one_line_error(result, "--write-gpu-profile writes one run's profile: give --batch, not --sweep-batch",
                          is_exact=True)
    assert not (tmp_path / "p.json").exists()
