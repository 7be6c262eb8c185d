import json

import pytest

from fastdecode.scheduler.config import SchedulerConfig
from fastdecode.scheduler.simulate import SimulationConfig, main, peak_step_ratio, simulate


@pytest.fixture(scope="session")
def default_run():
    return simulate(SimulationConfig())


@pytest.mark.slow
def test_sls_cuts_the_peak_context_by_at_least_35_percent(default_run):
    cfg = default_run["config"]
    assert (cfg["num_seqs"], cfg["prompt_len"], cfg["output_len"], cfg["batch_size"], cfg["num_shards"]) == (
        1024, 128, 1024, 256, 4
    )
    aao, sls = default_run["all_at_once"], default_run["sls"]
    assert aao["num_tokens"] == sls["num_tokens"] == 1024 * 1024
    assert aao["peak_total_context"] == pytest.approx(256 * (128 + 1024), rel=0.01)
    assert sls["peak_total_context"] == pytest.approx(256 * (128 + 512), rel=0.02)
    assert default_run["peak_context_reduction"] >= 0.35
    assert default_run["is_sls_pacing"] and default_run["peak_step_ratio"] > 5  # attention bounds the step there
    assert default_run["tokens_per_s_ratio"] >= 0.9  # not much slower
    assert sls["peak_step_ms"] < aao["peak_step_ms"]


def test_the_default_configuration_is_attention_bound():
    assert peak_step_ratio(SimulationConfig()) > 1.0 + SchedulerConfig().sls_attention_margin


def test_main_prints_json(capsys):
    """Slow shards: attention bounds the step and SLS cuts the peak. At the default 60 GB/s the same short batch's
    peak context adds under a tenth to its step: SLS has nothing to level and admits as all-at-once, and says so."""
    args = ["--json", "--num-seqs", "48", "--batch-size", "16", "--output-len", "64", "--prompt-len", "16"]
    assert main([*args, "--shard-gbps", "0.1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"config", "all_at_once", "sls", "peak_context_reduction", "tokens_per_s_ratio",
                        "peak_step_ratio", "is_sls_pacing"}
    assert out["all_at_once"]["num_tokens"] == 48 * 64
    assert out["is_sls_pacing"] and out["peak_context_reduction"] > 0.2
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["is_sls_pacing"] and out["peak_step_ratio"] <= 1.1
    assert out["peak_context_reduction"] == 0.0 and out["sls"] == out["all_at_once"]


def test_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["--num-shards", "0"])
    assert "num_shards" in capsys.readouterr().err
