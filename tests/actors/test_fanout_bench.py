"""The attend fan-out micro-benchmark prints its JSON contract (tiny sizes: this checks the tool, not speed)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_fanout_bench_json_contract() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastdecode.actors.fanout_bench", "--json", "--rows", "8", "--context", "4",
         "--repeats", "4", "--setups", "inproc1", "inproc4-threaded"],
        capture_output=True, text=True, timeout=110, check=True,
    ).stdout
    result = json.loads(out)
    runs = result["results"]
    assert [r["setup"] for r in runs] == ["inproc1", "inproc4-threaded"]
    assert [r["num_shards"] for r in runs] == [1, 4] and [r["rows_per_message"] for r in runs] == [8, 2]
    for run in runs:
        assert 0 < run["p50_us"] <= run["p99_us"] and run["cpu_us"] > 0 and run["context"] == 4
        stages = run["stages_us"]
        assert set(stages) == {"to_numpy_qkv", "encode_attend", "decode_attend", "handler", "native",
                               "encode_result", "decode_result", "from_numpy_o"}
        assert all(value > 0 for value in stages.values())
        assert "cpu_overhead_us" in run and "overhead_us" in run
