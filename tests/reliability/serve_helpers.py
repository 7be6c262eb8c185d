"""A live ``fdctl serve`` for the reliability tests (the frontend tests' LiveServer), and small readers."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "reliability_live_server", Path(__file__).resolve().parents[1] / "actors" / "frontend" / "live_server.py")
_live_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_live_server)
LiveServer = _live_server.LiveServer
TINY_ARGS = _live_server.TINY_ARGS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metric_values(text: str, name: str) -> list[float]:
    """Every sample of one metric (any labels) in Prometheus text."""
    return [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
