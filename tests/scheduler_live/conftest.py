"""The live scheduler tests reuse the executor tests' reference helpers (tests/ has no packages)."""
from __future__ import annotations

import sys
from pathlib import Path

_ACTORS_TESTS = str(Path(__file__).resolve().parent.parent / "actors")
if _ACTORS_TESTS not in sys.path:
    sys.path.append(_ACTORS_TESTS)
