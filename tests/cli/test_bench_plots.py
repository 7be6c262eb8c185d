"""fdctl bench with --out where no PNG can be drawn: the JSON still reaches stdout and the other files are written;
each skipped PNG is one warning line on stderr (matplotlib missing names the [plot] extra)."""
from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

from fastdecode.cli.bench import bench

HINT = "pip install 'fastdecode[plot]'"
TINY = ["--model", "random:tiny", "--dtype", "float32", "--device", "cpu", "--mode", "gpu-only", "--gpu-kv-memory",
        "1MiB", "--batch", "2", "--prompt-len", "4"]


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError


def run(args: list[str]) -> tuple[dict, list[str]]:
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr.strip().splitlines()


def test_offline_without_matplotlib_prints_json_and_writes_the_trace(tmp_path, monkeypatch, no_matplotlib):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, warnings = run(["offline", *TINY, "--output-len", "3", "--out", str(tmp_path)])
    assert out["batch"] == 2 and out["tokens_per_s"] > 0
    assert out["plot"] is None and out["trace"] == str(tmp_path / "trace-gpu-only-b2-pipe.json")
    trace = json.loads((tmp_path / "trace-gpu-only-b2-pipe.json").read_text())
    assert trace["steps"]
    assert not (tmp_path / "timeline-gpu-only-b2-pipe.png").exists()
    assert f"Warning: {tmp_path / 'timeline-gpu-only-b2-pipe.png'} not drawn: drawing plots needs matplotlib, " \
           f"which is not installed: {HINT}" in warnings


def test_offline_names_the_files_it_wrote(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = run(["offline", *TINY, "--output-len", "3", "--out", str(tmp_path)])
    assert out["plot"] == str(tmp_path / "timeline-gpu-only-b2-pipe.png") and os.path.exists(out["plot"])
    assert out["trace"] == str(tmp_path / "trace-gpu-only-b2-pipe.json") and os.path.exists(out["trace"])


def test_offline_with_no_decode_step_still_prints_json(tmp_path, monkeypatch):
    """One output token: prefill only, no decode step for the timeline to draw."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, warnings = run(["offline", *TINY, "--output-len", "1", "--out", str(tmp_path)])
    assert out["output_len"] == 1 and out["step_ms"] is None
    assert (tmp_path / "trace-gpu-only-b2-pipe.json").exists()
    assert any(line.endswith("not drawn: the trace has no decode steps") for line in warnings), warnings


def test_project_without_matplotlib_prints_json(tmp_path, no_matplotlib):
    out, warnings = run(["project", "--model", "llama3-8b", "--per-host-gbps", "20", "--max-hosts", "2",
                         "--prompt-len", "512", "--output-len", "128", "--out", str(tmp_path), "--json"])
    assert [row["hosts"] for row in out["rows"]] == [1, 2]
    assert out["plot"] is None and not (tmp_path / "projection.png").exists()
    assert [line for line in warnings if line.startswith("Warning:")] == [
        f"Warning: {tmp_path / 'projection.png'} not drawn: drawing plots needs matplotlib, which is not installed: "
        f"{HINT}"]


def test_roofline_plot_without_matplotlib_is_the_named_error(tmp_path, no_matplotlib):
    from fastdecode.cli.bench_plot import PlotUnavailableError
    from fastdecode.cli.bench_roofline import render_roofline

    with pytest.raises(PlotUnavailableError, match=r"fastdecode\[plot\]"):
        render_roofline({}, str(tmp_path / "roofline.png"))
