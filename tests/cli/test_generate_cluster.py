"""``fdctl generate`` on a cluster gives the reference's tokens."""
import json

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
