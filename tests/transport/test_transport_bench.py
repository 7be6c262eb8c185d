"""The transport benchmark runs end to end (tiny sizes) and reports every figure the issue asks for."""
from __future__ import annotations

import json

from fastdecode.transport import bench


def test_bench_reports_both_clients_against_raw_pyzmq(capsys):
    bench.main(["--json", "--repeats", "5", "--num-seqs", "2", "--transports", "tcp"])
    result = json.loads(capsys.readouterr().out)
    (case,) = result["cases"]
    assert case["transport"] == "tcp" and case["num_seqs"] == 2
    for run in ("ours", "ours_rpc_client", "raw_pyzmq", "raw_pyzmq_asyncio"):
        assert 0 < case[run]["p50_us"] <= case[run]["p99_us"] and case[run]["gbps"] > 0
    assert case["overhead_ratio"] == round(case["ours"]["p50_us"] / case["raw_pyzmq"]["p50_us"], 3)
    assert case["overhead_ratio_rpc_client"] == round(
        case["ours_rpc_client"]["p50_us"] / case["raw_pyzmq"]["p50_us"], 3)
    assert result["max_overhead_ratio"] == case["overhead_ratio"]
