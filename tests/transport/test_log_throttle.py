"""A warning a peer can repeat at will (transport/log_throttle.py): one line per interval, the rest counted."""
from __future__ import annotations

import logging

import fastdecode.transport.log_throttle as log_throttle
from fastdecode.transport.log_throttle import ThrottledWarning


def test_a_repeated_warning_leaves_a_line_per_interval_with_the_count_held_back(monkeypatch, caplog) -> None:
    now = [100.0]
    monkeypatch.setattr(log_throttle.time, "monotonic", lambda: now[0])
    warn = ThrottledWarning(logging.getLogger("fastdecode.test"), 10.0)
    for i in range(5):
        warn("peer %d sent junk", i)
    warn("another kind %s", "x")  # throttled on its own
    now[0] += 10.0
    warn("peer %d sent junk", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "peer 0 sent junk", "another kind x", "peer 5 sent junk (and 4 more since the last such line)"]
    assert {r.name for r in caplog.records} == {"fastdecode.test"}
