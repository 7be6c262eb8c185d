"""The benchmark's rounds: every reported figure is the best of its per-round figures, and every round
attends over the case's own lengths (figures themselves are not asserted)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastdecode.native import bench


@pytest.mark.usefixtures("one_torch_thread")  # main() sets torch's thread count: restored after
def test_two_rounds_report_the_best_of_each_figure(capsys):
    bench.main(["--json", "--cases", "2x300,3x100", "--rounds", "2", "--runs", "1",
                "--read-bytes", str(64 << 20), "--threads", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rounds = result["rounds"]
    assert result["num_rounds"] == len(rounds) == 2 and result["runs_per_round"] == 1
    for key in ("read_gbps", "read_native_gbps", "read_torch_sum_gbps"):
        assert result[key] == max(r[key] for r in rounds)
    for r in rounds:
        assert r["read_gbps"] == max(r["read_native_gbps"], r["read_torch_sum_gbps"])
        assert [c["name"] for c in r["cases"]] == ["2x300", "3x100"]
        for c in r["cases"]:
            assert c["ratio_to_read"] == pytest.approx(c["attn_gbps"] / r["read_gbps"], rel=1e-12)
    for i, case in enumerate(result["cases"]):
        per_round = [r["cases"][i] for r in rounds]
        assert case["t_ours_ms"] == min(c["t_ours_ms"] for c in per_round)
        assert case["t_torch_ms"] == min(c["t_torch_ms"] for c in per_round)
        assert case["attn_gbps"] == max(c["attn_gbps"] for c in per_round)
        assert case["attn_gbps"] == pytest.approx(case["kv_bytes"] / case["t_ours_ms"] / 1e6, rel=1e-12)
        assert case["ratio_to_read"] == pytest.approx(case["attn_gbps"] / result["read_gbps"], rel=1e-12)
        assert case["ratio_to_torch"] == pytest.approx(case["t_torch_ms"] / case["t_ours_ms"], rel=1e-12)
        assert case["pool_read_gbps"] == max(c["pool_read_gbps"] for c in per_round) > 0
        assert case["ratio_to_pool_read"] == pytest.approx(case["attn_gbps"] / case["pool_read_gbps"], rel=1e-12)


def test_best_read_and_best_attention_may_come_from_different_rounds():
    def fig(name, gbps, t_ours, t_torch, read, pool_read):
        return {"name": name, "attn_gbps": gbps, "t_ours_ms": t_ours, "t_torch_ms": t_torch,
                "ratio_to_read": gbps / read, "pool_read_gbps": pool_read}

    rounds = [{"read_gbps": 40.0, "read_native_gbps": 40.0, "read_torch_sum_gbps": 35.0,
               "cases": [fig("a", 36.0, 2.0, 9.0, 40.0, 38.0)]},
              {"read_gbps": 70.0, "read_native_gbps": 65.0, "read_torch_sum_gbps": 70.0,
               "cases": [fig("a", 30.0, 2.4, 7.0, 70.0, 60.0)]},
              {"read_gbps": 50.0, "read_native_gbps": 50.0, "read_torch_sum_gbps": 45.0,
               "cases": [fig("a", 33.0, 2.2, 8.0, 50.0, 48.0)]}]
    best = bench.combine_rounds(rounds, {"a": 72_000_000})
    assert (best["read_gbps"], best["read_native_gbps"], best["read_torch_sum_gbps"]) == (70.0, 65.0, 70.0)
    (case,) = best["cases"]
    assert (case["attn_gbps"], case["t_ours_ms"], case["t_torch_ms"]) == (36.0, 2.0, 7.0)
    assert case["ratio_to_read"] == pytest.approx(36.0 / 70.0)
    assert case["ratio_to_torch"] == pytest.approx(3.5)
    assert case["in_round_ratio_to_read_median"] == pytest.approx(33.0 / 50.0)
    assert case["pool_read_gbps"] == 60.0
    assert case["ratio_to_pool_read"] == pytest.approx(36.0 / 60.0)
    assert case["kv_bytes"] == 72_000_000


def test_refill_returns_every_sequence_to_its_case_length():
    case = bench.prepare_case("3x70", num_threads=1, isa=None, num_calls=bench.NUM_WARMUP + 2, page_size=16,
                              rng=np.random.default_rng(1))
    try:
        k_before, v_before = case.pool.read(1, 0)
        case.measure_ours(2)
        assert [case.pool.seq_len(b, 0) for b in range(3)] == [70 + bench.NUM_WARMUP + 2] * 3
        case.refill()
        assert [case.pool.seq_len(b, 0) for b in range(3)] == [70] * 3
        k_after, v_after = case.pool.read(1, 0)
        np.testing.assert_array_equal(k_after, k_before)
        np.testing.assert_array_equal(v_after, v_before)
        case.measure_ours(2)   # the pool still has room for a whole round after the refill
    finally:
        case.pool.close()


def test_a_round_runs_the_read_then_every_pool_read_then_ours_then_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "measure_read", lambda buf, num_runs, isa: calls.append("read") or
                        {"read_gbps": 50.0, "read_native_gbps": 50.0, "read_torch_sum_gbps": 40.0})
    monkeypatch.setattr(bench.PreparedCase, "refill", lambda self: calls.append(f"refill {self.name}"))
    monkeypatch.setattr(bench.PreparedCase, "measure_pool_read",
                        lambda self: calls.append(f"pool {self.name}") or 45.0)
    monkeypatch.setattr(bench.PreparedCase, "measure_ours", lambda self, num_runs: calls.append(f"ours {self.name}") or
                        {"name": self.name, "attn_gbps": 40.0, "t_ours_ms": 1.0})
    monkeypatch.setattr(bench.PreparedCase, "measure_torch", lambda self, num_runs: calls.append(f"torch {self.name}") or 5.0)
    cases = [bench.PreparedCase(name, [1], None, None, None, None, None, None, None) for name in ("a", "b")]
    rounds = bench.run_rounds(cases, None, num_rounds=2, num_runs=1, isa=None)
    one_round = ["read", "pool a", "pool b", "ours a", "ours b", "torch a", "torch b"]
    assert calls == one_round + ["refill a", "refill b"] + one_round
    assert rounds[1]["cases"][1] == {"name": "b", "attn_gbps": 40.0, "t_ours_ms": 1.0, "t_torch_ms": 5.0,
                                     "ratio_to_read": 0.8, "pool_read_gbps": 45.0}
