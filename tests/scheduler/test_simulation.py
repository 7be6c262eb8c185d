import json

import pytest

from fastdecode.scheduler.simulate import SimulationConfig, main, simulate


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
    assert default_run["tokens_per_s_ratio"] >= 0.9  # not much slower
    assert sls["peak_step_ms"] < aao["peak_step_ms"]


def test_main_prints_json(capsys):
    args = ["--json", "--num-seqs", "48", "--batch-size", "16", "--output-len", "64", "--prompt-len", "16"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"config", "all_at_once", "sls", "peak_context_reduction", "tokens_per_s_ratio"}
    assert out["all_at_once"]["num_tokens"] == 48 * 64
    assert out["peak_context_reduction"] > 0.2


def test_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["--num-shards", "0"])
    assert "num_shards" in capsys.readouterr().err
