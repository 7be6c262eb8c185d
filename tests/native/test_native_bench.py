"""The benchmark script's output contract, on a tiny case (figures themselves are not asserted)."""
from __future__ import annotations

import json
import os

import pytest

from fastdecode.native import bench
from fastdecode.native.lib import (ISA_ENV_VAR, PREFETCH_FAR_ENV_VAR, bf16_dot_cost, default_isa,
                                   prefetch_far_default)


@pytest.mark.usefixtures("one_torch_thread")  # main() sets torch's thread count: restored after
def test_bench_prints_one_json_object_last(capsys):
    bench.main(["--json", "--cases", "2x300", "--runs", "1",
                "--read-bytes", str(64 << 20), "--threads", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["threads"] == 1 and result["isa"] == (os.environ.get(ISA_ENV_VAR) or default_isa())
    far_env = os.environ.get(PREFETCH_FAR_ENV_VAR)
    assert result["prefetch_far"] == (far_env == "1" if far_env else prefetch_far_default())
    assert result["bf16_dot_cost"] == bf16_dot_cost()
    assert result["read_gbps"] >= max(result["read_native_gbps"], result["read_torch_sum_gbps"]) > 0
    (case,) = result["cases"]
    assert case["name"] == "2x300"
    assert case["kv_bytes"] == 2 * 300 * 8 * 128 * 2 * 2
    assert abs(case["ratio_to_read"] - case["attn_gbps"] / result["read_gbps"]) < 1e-9
    assert abs(case["ratio_to_torch"] - case["t_torch_ms"] / case["t_ours_ms"]) < 1e-9


def test_ragged_lengths_are_log_normal_around_2k_and_reproducible():
    lengths = bench.case_lengths("ragged")
    assert lengths == bench.case_lengths("ragged") and len(lengths) == 64
    assert 1024 < sorted(lengths)[32] < 4096 and max(lengths) > 2 * min(lengths)
    assert bench.case_lengths("3x7") == [7, 7, 7]
