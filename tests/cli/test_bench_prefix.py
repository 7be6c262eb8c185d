"""``fdctl bench prefix-cache``: both settings run the same prompts; only the cached one finds their prefix."""
from __future__ import annotations

import json

from click.testing import CliRunner

from fastdecode.cli.main import main


def test_the_cached_setting_finds_every_later_prompts_prefix():
    result = CliRunner().invoke(main, ["bench", "prefix-cache", "--model", "random:tiny", "--prefix-len", "64",
                                       "--suffix-len", "4", "--requests", "2", "--dtype", "float32",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    off, on = figures["settings"]
    assert (off["prefix_caching"], on["prefix_caching"]) == (False, True)
    assert off["hit_tokens"] == 0
    assert on["hit_tokens"] == 2 * 64  # each later prompt (68 tokens) finds the prefix's two 32-token blocks
    assert len(off["seconds"]) == len(on["seconds"]) == 2
    assert figures["speedup"] == off["median_s"] / on["median_s"]


def test_an_unknown_model_is_one_clear_line():
    result = CliRunner().invoke(main, ["bench", "prefix-cache", "--model", "no-such-model"])
    assert result.exit_code != 0
    assert "no-such-model" in result.output and "Traceback" not in result.output
