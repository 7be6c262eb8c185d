from fastdecode.actors.trace import StepTrace, union_length


def test_union_counts_overlap_once():
    assert union_length([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    assert union_length([]) == 0.0


def test_overlap_figure_from_busy_lanes():
    trace = StepTrace()
    trace.add_step(1, 0.0, 10.0, 4)
    trace.add(1, 0, "gpu", "dense", 0.0, 5.0)
    trace.add(1, 1, "gpu", "dense", 5.0, 10.0)
    trace.add(1, 0, "shard-a", "attend", 5.0, 10.0)
    trace.add(1, 1, "shard-a", "attend", 6.0, 9.0)  # overlaps the other mini-batch's call
    summary = trace.summary()
    assert summary["gpu_busy_s"] == 10.0
    assert summary["node_busy_s"] == {"shard-a": 5.0}
    assert summary["overlap"] == 0.75


def test_layer_breakdown_splits_a_cycle_into_its_gaps():
    trace = StepTrace()
    for step in (1, 2):  # dense 0-1 ms, attends 1.5-4 and 2-5 ms, next dense from 5.25 ms
        trace.add(step, 0, "gpu", "qkv", 0.0, 0.001)
        trace.add(step, 0, "shard-a", "attend", 0.0015, 0.004)
        trace.add(step, 0, "shard-b", "attend", 0.002, 0.005)
        trace.add(step, 0, "gpu", "dense", 0.00525, 0.00625)
    breakdown = trace.layer_breakdown()
    assert breakdown.keys() == {"dense_ms", "to_nodes_ms", "attend_ms", "back_ms"}
    assert abs(breakdown["dense_ms"] - 1.0) < 1e-9
    assert abs(breakdown["to_nodes_ms"] - 0.5) < 1e-9
    assert abs(breakdown["attend_ms"] - 3.5) < 1e-9
    assert abs(breakdown["back_ms"] - 0.25) < 1e-9


def test_layer_breakdown_is_empty_without_attend_intervals():
    trace = StepTrace()
    trace.add(1, 0, "gpu", "step", 0.0, 0.01)
    assert trace.layer_breakdown() == {}
