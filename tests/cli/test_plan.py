import json

import pytest
from click.testing import CliRunner

from fastdecode.cli.main import main
from fastdecode.scheduler.gpu_profile import GPU_SPECS
from fastdecode.scheduler.model_shape import LLAMA3_8B
from one_line_errors import assert_one_line_error

BASE = ["plan", "--prompt-len", "128", "--output-len", "1024"]


def run(*args):
    return CliRunner().invoke(main, [*BASE, *args])


def test_json_plan_for_70b_on_h200():
    result = run("--model", "llama3-70b", "--gpu", "h200", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    for key in ("batch_size", "num_shards", "tokens_per_s", "ms_per_token", "host_memory_gib"):
        assert key in plan
    assert plan["model"] == "llama3-70b" and plan["gpu"] == "h200"
    assert plan["bound"] == "gpu"
    assert plan["batch_size"] > 10 * plan["gpu_only_max_batch"] > 0
    assert plan["host_memory_gib"] == pytest.approx(plan["batch_size"] * 1152 * 320 * 1024 / 2**30)


def test_text_plan_and_options():
    result = run("--model", "llama3-8b", "--gpu", "a10", "--shard-gbps", "40", "--max-latency-ms", "80")
    assert result.exit_code == 0, result.output
    assert "batch size" in result.output and "tokens/s" in result.output and "why:" in result.output
    assert "(40 GB/s)" in result.output
    fp8 = json.loads(run("--model", "llama3-70b", "--gpu", "h100", "--dtype", "float8", "--json").output)
    assert fp8["weights_gib"] == pytest.approx(65.7, abs=0.3)  # 1 byte per weight fits an H100


def test_measured_profile_file(tmp_path):
    profile = GPU_SPECS["h100"].sweep(LLAMA3_8B, batches=(1, 16, 128, 512, 2048))
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(profile.to_json_dict()))
    from_file = json.loads(run("--model", "llama3-8b", "--gpu-profile", str(path), "--json").output)
    analytical = json.loads(run("--model", "llama3-8b", "--gpu", "h100", "--json").output)
    assert from_file["tokens_per_s"] == pytest.approx(analytical["tokens_per_s"], rel=0.1)
    # a profile of a different model is refused
    result = run("--model", "llama3-70b", "--gpu-profile", str(path))
    assert result.exit_code != 0 and "32-layer" in result.output


def test_shard_memory_limits_the_batch():
    small = json.loads(run("--model", "llama3-8b", "--shard-mem-gib", "1", "--json").output)
    same_twice = json.loads(run("--model", "llama3-8b", "--shard-mem-gib", "1", "--shard-mem-gib", "1",
                                "--json").output)
    unlimited = json.loads(run("--model", "llama3-8b", "--json").output)
    assert small == same_twice and small["batch_size"] < unlimited["batch_size"]


def test_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        (("--model", "llama3-8b", "--gpu", "h100", "--gpu-profile", str(bad)), "not both"),
        (("--model", "llama3-8b", "--gpu-profile", str(bad)), "cannot read GPU profile"),
        (("--model", "llama3-8b", "--gpu-profile", str(tmp_path / "missing.json")), "cannot read GPU profile"),
        (("--model", "no-such-model"), "unknown model"),
        (("--model", "llama3-70b", "--gpu", "a10"), "do not fit"),
        (("--model", "llama3-8b", "--max-latency-ms", "0.1"), "latency"),
        (("--model", "llama3-8b", "--shard-gbps", "-1"), "bandwidths"),
        # a repeated --shard-mem-gib was the last one, silently
        (("--model", "llama3-8b", "--shard-mem-gib", "0.0625", "--shard-mem-gib", "0.25"), "one figure"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (("--shard-mem-gib", "inf"), "Invalid value for '--shard-mem-gib': inf is not a finite number"),  # OverflowError
    (("--shard-mem-gib", "nan"), "Invalid value for '--shard-mem-gib': nan is not a finite number"),
    (("--shard-mem-gib", "0"), "Invalid value for '--shard-mem-gib': 0.0 is not in the range x>0"),
    (("--shard-overhead-us", "inf"), "Invalid value for '--shard-overhead-us': inf is not a finite number"),
    (("--shard-overhead-us", "-5"), "Invalid value for '--shard-overhead-us': -5.0 is not in the range x>=0"),
])
def test_non_finite_or_out_of_range_figures_are_one_line_errors(args, message):
    result = run("--model", "llama3-8b", *args)
    assert_one_line_error(result, f"{message}.", is_exact=True)


def test_a_length_past_the_models_context_is_refused():
    """random:tiny's context is 2048 tokens: a plan for 2000 + 100 plans requests its server refuses."""
    result = CliRunner().invoke(main, ["plan", "--model", "random:tiny", "--prompt-len", "2000", "--output-len", "100"])
    assert_one_line_error(result, "prompt 2000 + output 100 = 2100 tokens do not fit the model's context of 2048 "
                                  "tokens (max_position_embeddings): a server refuses such requests", is_exact=True)
    fits = CliRunner().invoke(main, ["plan", "--model", "random:tiny", "--prompt-len", "2000", "--output-len", "48",
                                     "--json"])
    assert fits.exit_code == 0, fits.output
    assert json.loads(fits.output)["mean_context_tokens"] == 2024
