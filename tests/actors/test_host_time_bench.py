"""The host-time benchmark runs the real Executor and splits each step into forward and host time."""
from __future__ import annotations

import json

import pytest

from fastdecode.actors import host_time_bench


@pytest.mark.parametrize("node", ["gpu-kv", "local"])
def test_the_bench_prints_one_row_per_batch_whose_parts_add_up(node, capsys, one_torch_thread):
    host_time_bench.main(["--batches", "1,3", "--repeats", "1", "--output-len", "6", "--node", node, "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["node"] == node
    assert [row["batch"] for row in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["num_steps"] == 5  # 6 tokens each: the first from the prefill
        assert 0 < row["forward_us"] < row["step_us"]
        assert row["host_us_per_step"] == pytest.approx(row["step_us"] - row["forward_us"])
        assert row["loop_us_per_step"] + row["dense_calls_host_us_per_step"] == pytest.approx(row["host_us_per_step"])
