"""``--max-num-batched-tokens`` on ``fdctl serve`` and ``fdctl start-gpu`` reaches the Executor's config."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from fastdecode.cli.main import main
from fastdecode.cli.serve import build_config

OPTIONS = dict(model="random:tiny", host="127.0.0.1", port=0, api_key=None, served_model_name=None,
               max_model_len=None, max_num_seqs=8, max_queue=16, dtype="float32", device="cpu", seed=0,
               is_unpipelined=False, num_shards=0, shard_addresses=(), kv_memory_bytes=None)


@pytest.mark.parametrize("value", [1, 512, 0])
def test_the_token_limit_reaches_the_executor_config(value):
    config = build_config(**OPTIONS, max_num_batched_tokens=value)
    assert config.cluster.executor.max_num_batched_tokens == value


def test_the_default_chunks_by_the_device():
    executor = build_config(**OPTIONS).cluster.executor
    assert executor.max_num_batched_tokens is None
    assert executor.batched_tokens_for(torch.device("cpu")) == 256
    assert executor.batched_tokens_for(torch.device("cuda")) == 2048


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_both_commands_take_the_option_and_refuse_a_negative_limit(command):
    runner = CliRunner()
    assert "--max-num-batched-tokens" in runner.invoke(main, [command, "--help"]).output
    result = runner.invoke(main, [command, "--max-num-batched-tokens", "-1", "--shard", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "--max-num-batched-tokens" in result.output
