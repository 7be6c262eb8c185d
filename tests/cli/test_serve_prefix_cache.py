"""``--enable-prefix-caching`` / ``--prefix-cache-memory`` on ``fdctl serve`` and ``fdctl start-gpu``, and vLLM's
``enable_prefix_caching`` keyword of ``LLM``, reach the Executor's config."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fastdecode.actors.api_inputs import cluster_config
from fastdecode.actors.prefix_cache import DEFAULT_CACHE_BYTES
from fastdecode.cli.main import main
from fastdecode.cli.serve import build_config

OPTIONS = dict(model="random:tiny", host="127.0.0.1", port=0, api_key=None, served_model_name=None,
               max_model_len=None, max_num_seqs=8, max_queue=16, dtype="float32", device="cpu", seed=0,
               is_unpipelined=False, num_shards=0, shard_addresses=(), kv_memory_bytes=None)


def test_prefix_caching_is_on_by_default_and_sized_by_its_option():
    assert build_config(**OPTIONS).cluster.executor.prefix_cache_bytes == DEFAULT_CACHE_BYTES == 2 << 30
    sized = build_config(**OPTIONS, prefix_cache_memory_bytes=1 << 20)
    assert sized.cluster.executor.prefix_cache_bytes == 1 << 20
    off = build_config(**OPTIONS, is_prefix_caching=False, prefix_cache_memory_bytes=1 << 20)
    assert off.cluster.executor.prefix_cache_bytes == 0


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_both_commands_take_the_options(command):
    runner = CliRunner()
    help_text = runner.invoke(main, [command, "--help"]).output
    for option in ("--enable-prefix-caching", "--no-enable-prefix-caching", "--prefix-cache-memory"):
        assert option in help_text
    result = runner.invoke(main, [command, "--prefix-cache-memory", "lots", "--shard", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "--prefix-cache-memory" in result.output


def test_llm_takes_vllms_keyword():
    assert cluster_config("random:tiny", enable_prefix_caching=False).executor.prefix_cache_bytes == 0
    assert cluster_config("random:tiny", enable_prefix_caching=True).executor.prefix_cache_bytes == DEFAULT_CACHE_BYTES
    assert cluster_config("random:tiny").executor.prefix_cache_bytes == DEFAULT_CACHE_BYTES
    assert cluster_config("random:tiny", enable_prefix_caching=None).executor.prefix_cache_bytes == DEFAULT_CACHE_BYTES
