"""fdctl trace-plot: a PNG timeline from a step trace; without matplotlib (the [plot] extra) one error line."""
from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from fastdecode.cli.trace_plot import trace_plot

NO_MATPLOTLIB = "Error: drawing plots needs matplotlib, which is not installed: pip install 'fastdecode[plot]'"


def write_trace(path) -> str:
    """Two decode steps of a GPU lane and one shard lane, two mini-batches each."""
    intervals = [{"step": step, "minibatch": mb, "lane": lane, "kind": "attend", "start_s": start, "end_s": start + 0.4}
                 for step in (0, 1) for mb in (0, 1) for lane, start in (("gpu", step + mb * 0.5),
                                                                           ("shard-0", step + mb * 0.5 + 0.1))]
    steps = [{"step": step, "start_s": float(step), "end_s": step + 1.0, "batch_size": 4} for step in (0, 1)]
    path.write_text(json.dumps({"intervals": intervals, "steps": steps, "summary": {"overlap": 0.5}}))
    return str(path)


def test_trace_plot_draws_the_timeline(tmp_path):
    out = tmp_path / "t.png"
    result = CliRunner().invoke(trace_plot, [write_trace(tmp_path / "t.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_trace_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    out = tmp_path / "t.png"
    result = CliRunner().invoke(trace_plot, [write_trace(tmp_path / "t.json"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [NO_MATPLOTLIB]
    assert not out.exists()


def test_trace_plot_rejects_a_file_that_is_no_trace(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": []}))
    result = CliRunner().invoke(trace_plot, [str(bad), "--out", str(tmp_path / "t.png")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {bad} is not a step trace: the trace has no decode steps"]



def test_trace_plot_to_a_folder_that_does_not_exist_is_one_line(tmp_path):
    out = tmp_path / "missing" / "t.png"
    result = CliRunner().invoke(trace_plot, [write_trace(tmp_path / "t.json"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"Error: cannot write {out}: No such file or directory"]


def test_trace_plot_steps_below_one_is_one_line(tmp_path):
    """--steps 0 drew every step ([-0:] is the whole list) and a negative count all but the first ones."""
    out = tmp_path / "t.png"
    for steps in ("0", "-1"):
        result = CliRunner().invoke(trace_plot, [write_trace(tmp_path / "t.json"), "--out", str(out), "--steps", steps])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            f"Error: Invalid value for '--steps': {steps} is not in the range x>=1."]
        assert not out.exists()
