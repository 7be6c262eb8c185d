"""The analytical GPU that ``fdctl plan`` and ``bench project`` take where no ``--gpu`` is given: one default for the
dense step, the GPU memory and the gpu-only row's HBM bandwidth."""
from __future__ import annotations

import json

from click.testing import CliRunner

from fastdecode.cli.bench import bench
from fastdecode.cli.plan import DEFAULT_GPU, gpu_spec
from fastdecode.scheduler.gpu_profile import GPU_SPECS
from fastdecode.scheduler.model_shape import LLAMA3_8B

BASE = ["project", "--model", "llama3-8b", "--per-host-gbps", "20", "--max-hosts", "1", "--prompt-len", "512",
        "--output-len", "128", "--json"]


def test_no_gpu_is_the_default_gpus_spec():
    assert DEFAULT_GPU == "h100" and gpu_spec(None) is GPU_SPECS["h100"]
    assert gpu_spec("h200") is GPU_SPECS["h200"]


def test_bench_project_reads_the_kv_at_the_default_gpus_bandwidth(tmp_path):
    """With a profile and no --hbm-gbps, the gpu-only row reads its KV at the default GPU's bandwidth; without
    --gpu it is the default GPU's row."""
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(GPU_SPECS["h200"].sweep(LLAMA3_8B, batches=(1, 64, 512)).to_json_dict()))
    default_hbm_gbps = GPU_SPECS[DEFAULT_GPU].hbm_bytes_per_s / 1e9
    for args in (("--gpu-profile", str(profile)), ()):
        result = CliRunner().invoke(bench, [*BASE, *args])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["hbm_gbps"] == default_hbm_gbps
    named = CliRunner().invoke(bench, [*BASE, "--gpu", "h200"])
    assert json.loads(named.stdout)["hbm_gbps"] == GPU_SPECS["h200"].hbm_bytes_per_s / 1e9 != default_hbm_gbps
