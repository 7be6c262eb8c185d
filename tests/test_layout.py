"""The suite's own layout: tests/ has no packages, so every module basename must be unique
(pytest imports them by basename; a second test_x.py elsewhere breaks collection)."""
from collections import Counter
from pathlib import Path


def test_test_module_basenames_are_unique():
    names = Counter(p.name for p in Path(__file__).parent.rglob("*.py") if p.name != "conftest.py")
    assert [n for n, c in names.items() if c > 1] == []
