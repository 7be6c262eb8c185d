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
