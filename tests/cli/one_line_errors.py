"""The check every CLI refusal test makes: exit code 2, no traceback, one line ``Error: ...``."""
from __future__ import annotations


def assert_one_line_error(result, expected: str, *, is_exact: bool = False) -> str:
    """``result`` (a click ``CliRunner`` result) ended with exit code 2 and printed one line, ``Error: `` and
    ``expected`` in it (``is_exact``: all of the rest of it). The line."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    if is_exact:
        assert lines[0] == f"Error: {expected}", lines[0]
    else:
        assert expected in lines[0], lines[0]
    return lines[0]
