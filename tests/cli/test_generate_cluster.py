"""``fdctl generate`` on a cluster gives the reference's tokens."""
import json

import pytest
from click.testing import CliRunner

from fastdecode.cli.generate import generate


def run(*extra: str) -> dict:
    result = CliRunner().invoke(generate, ["--model", "random:tiny", "--prompt", "hello world", "--max-tokens", "12",
                                           "--ignore-eos", "--dtype", "float32", "--device", "cpu", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_in_process_shards_give_the_reference_tokens():
    reference = run()
    assert len(reference["token_ids"]) == 12
    assert run("--shards", "2") == reference


def test_shards_and_addresses_together_is_a_usage_error():
    result = CliRunner().invoke(generate, ["--model", "random:tiny", "--prompt", "x", "--shards", "1",
                                           "--shard", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "not both" in result.output


def test_kv_memory_option_sizes_each_in_process_shard(monkeypatch):
    from fastdecode.cli import generate as generate_module

    configs = []
    original = generate_module._generate_on_cluster

    async def recording(config, prompt_ids, params):
        configs.append(config)
        return await original(config, prompt_ids, params)

    monkeypatch.setattr(generate_module, "_generate_on_cluster", recording)
    assert run("--shards", "2", "--kv-memory", "3MiB") == run()
    assert [(c.num_shards, c.shard_kv_memory_bytes, c.executor.max_model_len) for c in configs] == [(2, 3 << 20, None)]


def test_one_shot_default_kv_memory_is_what_the_prompt_needs(tiny_model):
    from fastdecode.actors.cluster import MIN_EMBEDDED_KV_BYTES
    from fastdecode.cli.generate import GenerateOptions, cluster_config, one_shot_kv_bytes

    model, _ = tiny_model
    options = GenerateOptions(model="random:tiny", prompt_token_ids=(1, 2, 3), max_tokens=20, num_shards=2)
    config = cluster_config(options, model, num_prompt_tokens=3)
    assert config.shard_kv_memory_bytes == MIN_EMBEDDED_KV_BYTES == 64 << 20  # not a share of the host's memory
    assert config.executor.max_model_len == 23  # what the KV is sized for: no longer sequence is admitted
    token_bytes = model.config.kv_bytes_per_token(model.dtype.itemsize)
    floor_tokens = MIN_EMBEDDED_KV_BYTES // token_bytes
    # past the floor: whole 256-token pages (the largest a shard takes) for prompt + max_tokens
    assert one_shot_kv_bytes(model, floor_tokens + 1) == (floor_tokens // 256 + 1) * 256 * token_bytes
    long_prompt = cluster_config(options, model, num_prompt_tokens=model.config.max_position_embeddings - 1)
    assert long_prompt.executor.max_model_len == model.config.max_position_embeddings  # cut to the context
    daemons = cluster_config(GenerateOptions(model="random:tiny", prompt_token_ids=(1,), shard_addresses=("tcp://x:1",)),
                             model, num_prompt_tokens=1)
    assert daemons.shard_kv_memory_bytes is None and daemons.executor.max_model_len is None


@pytest.mark.parametrize("args, message", [
    (["--kv-memory", "1GiB"], "--kv-memory sizes in-process shards"),
    (["--shard", "tcp://127.0.0.1:1", "--kv-memory", "1GiB"], "--kv-memory sizes in-process shards"),
    (["--shards", "1", "--kv-memory", "1KiB"], "--kv-memory must be at least 1 MiB"),
    (["--shards", "1", "--kv-memory", "lots"], "cannot read 'lots' as a size"),
])
def test_bad_kv_memory_is_one_line_exit_2(args, message):
    result = CliRunner().invoke(generate, ["--model", "random:tiny", "--prompt-ids", "1,2", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
