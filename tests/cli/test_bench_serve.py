"""fdctl bench serve against a live random:tiny server (CPU) that needs an API key."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fastdecode.cli.bench import bench
from fastdecode.cli.serve import API_KEY_ENV

sys.path.insert(0, str(Path(__file__).parents[1] / "actors" / "frontend"))
from live_server import TINY_ARGS, LiveServer  # noqa: E402

pytestmark = pytest.mark.timeout(120)
API_KEY = "bench-key"
MAX_MODEL_LEN = 32


@pytest.fixture(scope="module")
def keyed_url():
    with LiveServer(*TINY_ARGS, "--shards", "0", "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN)) as server:
        yield server.url


def bench_serve(url: str, *args: str, env: dict[str, str | None] | None = None):
    args = ["serve", "--url", url, "--rate", "50", "--num-requests", "2", "--prompt-len", "4", "--output-len", "3",
            "--vocab", "50", *args]
    return CliRunner().invoke(bench, args, env={API_KEY_ENV: None, **(env or {})})


@pytest.mark.parametrize("how", ["option", "env"])
def test_key_from_option_or_env_is_sent(keyed_url, how):
    result = bench_serve(keyed_url, *(["--api-key", API_KEY] if how == "option" else []),
                         env={API_KEY_ENV: API_KEY} if how == "env" else None)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_ok"] == 2 and out["num_errors"] == 0, out["errors"]


@pytest.mark.parametrize("key", [None, "wrong"], ids=["missing", "wrong"])
def test_refused_key_is_one_line_with_status_and_message(keyed_url, key):
    result = bench_serve(keyed_url, *(["--api-key", key] if key else []))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: cannot list models at {keyed_url}: HTTP 401: missing or wrong API key")
    assert len(result.output.strip().splitlines()) == 1


def test_refused_completion_reports_status_and_message(keyed_url):
    """Every request refused: the JSON still comes, then one ``Error:`` line with the count and the first error,
    exit 1 (it exited 0 before)."""
    result = bench_serve(keyed_url, "--api-key", API_KEY, "--prompt-len", str(MAX_MODEL_LEN + 1))
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_ok"] == 0 and out["num_errors"] == 2
    [error] = out["errors"]
    assert error.startswith("HTTP 400: ") and f"context is {MAX_MODEL_LEN} tokens" in error and "{" not in error
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert line == f"Error: all 2 requests failed; the first: {error}"


def test_default_prompts_suit_the_tiny_vocabulary(keyed_url):
    """Without --vocab the prompt ids come from the server's /tokenize: valid for random:tiny's 320 ids (the old
    default drew from [0, 1000) and every request failed)."""
    args = ["serve", "--url", keyed_url, "--api-key", API_KEY, "--rate", "50", "--num-requests", "3",
            "--prompt-len", "20", "--output-len", "2"]
    result = CliRunner().invoke(bench, args, env={API_KEY_ENV: None})
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_ok"] == 3 and out["num_errors"] == 0, out["errors"]
    assert out["prompt_ids"].startswith("/tokenize (") and "no /tokenize" not in result.stderr
