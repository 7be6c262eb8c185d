"""``fdctl serve`` and ``fdctl start-gpu``: start-up refusals as one line (exit 2), clean stop on
a signal, and the default model served live (greedy output equal to ``fdctl generate``'s engine)."""
from __future__ import annotations

import importlib.util
import json
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams
from fastdecode.cli.main import main

_HELPER = Path(__file__).resolve().parents[1] / "actors" / "frontend" / "live_server.py"
_spec = importlib.util.spec_from_file_location("frontend_live_server", _HELPER)
live_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live_server)

TINY = ["--model", "random:tiny", "--dtype", "float32", "--device", "cpu", "--port", "0"]


@pytest.fixture
def server_configs(monkeypatch) -> list:
    """The ServeConfig of every serve/start-gpu run in the test, which builds it and serves nothing."""
    import fastdecode.cli.serve as serve_module

    configs = []
    monkeypatch.setattr(serve_module, "run_server", lambda config, **_: configs.append(config))
    return configs


@pytest.fixture
def torch_rng_restored():
    """torch's CPU generator as it was (run_server seeds it with --seed)."""
    import torch

    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture(autouse=True)
def process_state_restored(root_log_level_restored, torch_rng_restored):
    """Every test here leaves the root logger's level and torch's generator as it found them: a run that reaches the
    real run_server (``refuse`` of a shard nobody answers, of a busy port...) sets the one from --log-level and seeds
    the other with --seed."""
    yield


def shard_args(command: str) -> list[str]:
    return ["--shard", "tcp://127.0.0.1:5555"] if command == "start-gpu" else []


def refuse(*args: str) -> str:
    """Run ``fdctl`` in-process; it must fail with exit 2 and one ``Error:`` line on stderr."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_usage_errors_are_one_line():
    assert "--shards or --shard" in refuse("serve", *TINY, "--shards", "1", "--shard", "tcp://127.0.0.1:5555")
    assert "--shard" in refuse("start-gpu", *TINY)
    assert "max_num_seqs" in refuse("serve", *TINY, "--shards", "0", "--max-num-seqs", "0")
    assert "size" in refuse("serve", *TINY, "--kv-memory", "lots")
    assert "port" in refuse("serve", *TINY[:-1], "70000")
    assert "--listen" in refuse("start-shard", "--kv-memory", "1GiB")  # no usage block for these either
    assert "--out" in refuse("keygen")
    assert "--prompt-len" in refuse("plan", "--model", "llama3-8b")
    assert "page_size" in refuse("start-shard", "--listen", "tcp://127.0.0.1:0", "--kv-memory", "64MiB",
                                 "--page-size", "48")


def test_an_unreachable_shard_is_one_line_with_a_hint():
    """start-gpu in front of a shard nobody answers at (wrong address, firewall, refused CURVE key): one line
    that says where to look, not a PeerDeadError traceback with exit 1."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    line = refuse("start-gpu", *TINY, "--shard", f"tcp://127.0.0.1:{port}")
    assert f"no KVShard answers at tcp://127.0.0.1:{port}" in line
    assert "address" in line and "firewall" in line and "CURVE keys" in line


def test_a_shard_refusing_the_executor_is_one_line():
    from fastdecode.cli.errors import shard_error_message
    from fastdecode.transport.errors import RemoteRequestError

    assert shard_error_message(RemoteRequestError("busy", "another Executor holds 2 sequence(s)")) == (
        "a shard refused this Executor: another Executor holds 2 sequence(s)")
    assert "[bad_request]: head_dim 8" in shard_error_message(RemoteRequestError("bad_request", "head_dim 8"))


def test_a_context_no_kv_node_holds_is_refused_at_start():
    line = refuse("serve", *TINY, "--shards", "1", "--kv-memory", "1MiB", "--model", "random:smollm2-135m",
                  "--max-model-len", "4096")
    assert "does not fit the KV-cache" in line and "max_model_len 4096" in line


def test_a_context_past_the_models_is_refused_at_start():
    """vLLM refuses a --max-model-len past the model's own context at start; it was cut to it silently."""
    line = refuse("serve", *TINY, "--shards", "0", "--max-model-len", "4096")
    assert "max_model_len 4096 is longer than the model's context of 2048" in line


def test_token_counts_take_vllms_suffixes():
    from fastdecode.cli.sizes import parse_count

    assert [parse_count(t) for t in ("4096", "4k", "4K", "25.6k", "1m", "2M", " 8 ")] == [
        4096, 4000, 4096, 25600, 10**6, 2 << 20, 8]
    for bad, message in (("4KiB", "cannot read"), ("1.5K", "did you mean 1.5k"), ("1.0005k", "whole number"),
                         ("-1", "cannot read"), ("", "cannot read")):
        with pytest.raises(ValueError, match=message):
            parse_count(bad)
    line = refuse("serve", *TINY, "--shards", "0", "--max-model-len", "4K")  # read as 4096: past the model's
    assert "max_model_len 4096 is longer than the model's context of 2048" in line
    assert "less than 1" in refuse("serve", *TINY, "--shards", "0", "--max-model-len", "0")
    assert "did you mean 2.5k" in refuse("serve", *TINY, "--max-num-batched-tokens", "2.5K")


def test_scheduler_options_reach_the_config():
    from fastdecode.cli.serve import build_config

    config = build_config(model="random:tiny", host="127.0.0.1", port=0, api_key=None, served_model_name=None,
                          max_model_len=None, max_num_seqs=8, max_queue=16, dtype="float32", device="cpu",
                          seed=0, admission="all-at-once", overcommit=2.0, is_unpipelined=False, num_shards=0,
                          shard_addresses=(), kv_memory_bytes=None)
    scheduler = config.cluster.executor.scheduler
    assert (scheduler.admission, scheduler.overcommit, scheduler.max_num_seqs) == ("all-at-once", 2.0, 8)
    assert scheduler.max_reserved_output == 4096
    assert "overcommit" in refuse("serve", *TINY, "--shards", "0", "--overcommit", "0.5")
    for given, reserved in ((0, None), (100, 100)):
        config = build_config(model="random:tiny", host="127.0.0.1", port=0, api_key=None, served_model_name=None,
                              max_model_len=None, max_num_seqs=8, max_queue=16, dtype="float32", device="cpu",
                              seed=0, max_reserved_output=given, is_unpipelined=False, num_shards=0,
                              shard_addresses=(), kv_memory_bytes=None)
        assert config.cluster.executor.scheduler.max_reserved_output == reserved
    assert "max-reserved-output" in refuse("serve", *TINY, "--shards", "0", "--max-reserved-output", "-1")


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_vllms_common_flags_are_taken_where_they_mean_something_here(server_configs, command):
    """A vLLM command line's --enforce-eager turns CUDA graphs and compiling off; --trust-remote-code and
    --disable-log-stats have nothing to turn on or off here; --tensor-parallel-size takes 1 alone."""
    configs, shard = server_configs, shard_args(command)
    runner = CliRunner()
    assert runner.invoke(main, [command, *TINY, *shard]).exit_code == 0
    assert (configs[-1].cluster.is_cuda_graphs, configs[-1].cluster.is_compiled) == (True, True)
    flags = ["--enforce-eager", "--trust-remote-code", "--disable-log-stats", "--tensor-parallel-size", "1"]
    result = runner.invoke(main, [command, *TINY, *shard, *flags])
    assert result.exit_code == 0, result.output
    assert (configs[-1].cluster.is_cuda_graphs, configs[-1].cluster.is_compiled) == (False, False)
    refused = runner.invoke(main, [command, *TINY, *shard, "-tp", "2"])
    assert refused.exit_code == 2 and "runs the model on one GPU" in refused.output


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_tool_calling_response_role_and_max_logprobs_options_reach_the_config(server_configs, command):
    """vLLM's --enable-auto-tool-choice (which needs --tool-call-parser), --tool-call-parser, --response-role and
    --max-logprobs."""
    configs, shard = server_configs, shard_args(command)
    runner = CliRunner()
    assert runner.invoke(main, [command, *TINY, *shard]).exit_code == 0
    assert configs[-1].cluster.executor.max_logprobs == 20
    assert runner.invoke(main, [command, *TINY, *shard, "--max-logprobs", "-1"]).exit_code == 0
    assert configs[-1].cluster.executor.max_logprobs == -1
    assert runner.invoke(main, [command, *TINY, *shard, "--max-logprobs", "-2"]).exit_code == 2
    assert runner.invoke(main, [command, *TINY, *shard]).exit_code == 0
    default = configs[-1].frontend
    assert (default.tool_serving.is_auto_enabled, default.tool_serving.parser, default.response_role) == (
        False, None, "assistant")
    result = runner.invoke(main, [command, *TINY, *shard, "--enable-auto-tool-choice", "--tool-call-parser",
                                  "llama3_json", "--response-role", "bot", "--reasoning-parser", "qwen3"])
    assert result.exit_code == 0, result.output
    frontend = configs[-1].frontend
    assert frontend.reasoning_parser == "qwen3" and default.reasoning_parser is None
    assert (frontend.tool_serving.is_auto_enabled, frontend.tool_serving.parser, frontend.response_role) == (
        True, "llama3_json", "bot")
    alone = runner.invoke(main, [command, *TINY, *shard, "--enable-auto-tool-choice"])
    assert alone.exit_code == 2 and "needs --tool-call-parser" in alone.output
    unknown = runner.invoke(main, [command, *TINY, *shard, "--tool-call-parser", "mistral"])
    assert unknown.exit_code == 2 and "hermes" in unknown.output


def test_mode_and_gpu_memory_options_reach_the_cluster_config(server_configs):
    """--mode picks where the KV lives (gpu-only implies no shards); vLLM's --gpu-memory-utilization, or
    --gpu-kv-memory, sizes the GPU's pool (one of them)."""
    configs = server_configs
    runner = CliRunner()
    result = runner.invoke(main, ["serve", *TINY, "--mode", "gpu-only", "--gpu-memory-utilization", "0.85"])
    assert result.exit_code == 0, result.output
    cluster = configs[-1].cluster
    assert (cluster.mode, cluster.num_shards, cluster.gpu_memory_utilization) == ("gpu-only", 0, 0.85)
    result = runner.invoke(main, ["serve", *TINY, "--mode", "hybrid", "--shards", "2", "--gpu-kv-memory", "2GiB"])
    assert result.exit_code == 0, result.output
    assert (configs[-1].cluster.mode, configs[-1].cluster.gpu_kv_memory_bytes) == ("hybrid", 2 << 30)
    for args, message in ((["--mode", "gpu-only", "--shards", "1"], "gpu-only mode takes no shards"),
                          (["--gpu-memory-utilization", "0.5", "--gpu-kv-memory", "1GiB"], "not both"),
                          (["--gpu-memory-utilization", "0"], "0<x<=1")):
        refused = runner.invoke(main, ["serve", *TINY, *args])
        assert refused.exit_code == 2 and message in refused.output, refused.output


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_cors_options_reach_the_frontend_config(server_configs, command):
    """vLLM's option names and defaults; lists as a JSON list (vLLM's syntax) or comma-separated."""
    configs, shard = server_configs, shard_args(command)
    runner = CliRunner()
    assert runner.invoke(main, [command, *TINY, *shard]).exit_code == 0
    default = configs[-1].frontend
    assert (default.allowed_origins, default.allowed_methods, default.allowed_headers) == (("*",), ("*",), ("*",))
    assert default.is_credentials_allowed is False
    result = runner.invoke(main, [command, *TINY, *shard, "--allowed-origins", '["https://a.example", "http://b:8"]',
                                  "--allowed-methods", "GET, POST", "--allowed-headers", '["Authorization"]',
                                  "--allow-credentials"])
    assert result.exit_code == 0, result.output
    frontend = configs[-1].frontend
    assert frontend.allowed_origins == ("https://a.example", "http://b:8")
    assert frontend.allowed_methods == ("GET", "POST") and frontend.allowed_headers == ("Authorization",)
    assert frontend.is_credentials_allowed is True


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_the_api_key_may_come_from_the_environment(server_configs, command):
    """FASTDECODE_API_KEY stands for --api-key (which wins over it): the key reaches the Frontend, and with it a
    non-loopback --host is served, not refused for want of a key."""
    configs, shard = server_configs, shard_args(command)
    runner = CliRunner(env={"FASTDECODE_API_KEY": "env-key"})
    result = runner.invoke(main, [command, *TINY, *shard, "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert (configs[-1].frontend.api_key, configs[-1].host) == ("env-key", "0.0.0.0")
    result = runner.invoke(main, [command, *TINY, *shard, "--api-key", "flag-key"])
    assert result.exit_code == 0, result.output
    assert configs[-1].frontend.api_key == "flag-key"
    result = CliRunner(env={"FASTDECODE_API_KEY": None, "VLLM_API_KEY": "vllm-key"}).invoke(
        main, [command, *TINY, *shard, "--host", "0.0.0.0"])  # vLLM's variable, where ours is not set
    assert result.exit_code == 0, result.output
    assert configs[-1].frontend.api_key == "vllm-key"
    result = CliRunner(env={"FASTDECODE_API_KEY": None, "VLLM_API_KEY": None}).invoke(
        main, [command, *TINY, *shard, "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without --api-key" in result.output


def test_bad_cors_options_are_one_line():
    assert "no trailing slash" in refuse("serve", *TINY, "--allowed-origins", "https://a.example/")
    assert "not a JSON list" in refuse("serve", *TINY, "--allowed-origins", '["https://a.example"')
    assert "JSON list of strings" in refuse("serve", *TINY, "--allowed-methods", "[1, 2]")


def test_unknown_model_is_refused_at_start():
    assert "unknown model" in refuse("serve", "--model", "no-such-model", "--shards", "0", "--port", "0")


def test_sliding_window_model_is_refused_at_start(tmp_path):
    from fastdecode.cli.make_random_model import make_random_model

    folder = tmp_path / "windowed"
    make_random_model("tiny", 0, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    assert "sliding window" in refuse("serve", "--model", str(folder), "--shards", "0", "--port", "0")


def test_busy_port_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "cannot listen" in refuse("serve", *TINY[:-1], str(port), "--shards", "0")


def test_sigint_stops_cleanly():
    """(At ``--log-level warning``: the server's INFO lines, "cluster up" and the like, are left out.)"""
    server = live_server.LiveServer(*live_server.TINY_ARGS, "--shards", "0", "--log-level", "warning")
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0
    assert "stopped" in server.log()
    assert " INFO " not in server.log() and "serving random:tiny on http://" in server.log()
    assert server.stop() == 0


def test_start_gpu_serves_in_front_of_a_shard_daemon(tiny_model):
    with tempfile.TemporaryFile("w+") as shard_log:
        shard = subprocess.Popen([live_server.FDCTL, "start-shard", "--listen", "tcp://127.0.0.1:0", "--kv-memory",
                                  "64MiB", "--no-calibrate"], stdout=subprocess.DEVNULL, stderr=shard_log)
        try:
            address = None
            for _ in range(600):
                shard_log.seek(0)
                found = re.search(r"ready (tcp://\S+)", shard_log.read())
                if found or shard.poll() is not None:
                    address = found and found.group(1)
                    break
                time.sleep(0.05)
            assert address, "the shard daemon did not get ready"
            with live_server.LiveServer(*live_server.TINY_ARGS, "--shard", address, command="start-gpu") as server:
                body = json.dumps({"prompt": "Hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True})
                request = urllib.request.Request(server.url + "/v1/completions", data=body.encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    text = json.loads(response.read())["choices"][0]["text"]
        finally:
            shard.terminate()
            shard.wait(30)
    model, tokenizer = tiny_model
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert text == reference_generate(model, tokenizer, tokenizer.encode("Hello"), params).text


def test_help_lists_the_commands():
    result = subprocess.run([live_server.FDCTL, "--help"], capture_output=True, text=True, check=True)
    assert all(name in result.stdout for name in ("serve", "start-gpu", "client"))


# ---- the default model, live -------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_served_equals_generate(smollm2_model):
    openai = pytest.importorskip("openai")
    model, tokenizer = smollm2_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = "The three primary colors are"
    with live_server.LiveServer("--model", "smollm2", "--dtype", "float32", "--device", "cpu", "--kv-memory", "512MiB") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                              stream=True)
        chat_text = "".join(chunk.choices[0].delta.content or "" for chunk in chat)
        completion = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    greedy_chat = SamplingParams(max_tokens=24, temperature=0.0)
    assert chat_text == reference_generate(model, tokenizer, tokenizer.encode_chat(messages), greedy_chat).text
    assert "Paris" in chat_text
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    assert completion.choices[0].text == reference_generate(model, tokenizer, tokenizer.encode(prompt), greedy).text


# ---- log level and access log ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_log_options_reach_the_server(monkeypatch, command):
    """``--log-level`` as start-shard's (choices, default info); vLLM's ``--disable-uvicorn-access-log``."""
    import fastdecode.cli.serve as serve_module

    calls = []
    monkeypatch.setattr(serve_module, "run_server", lambda config, **kwargs: calls.append((config, kwargs)))
    shard = shard_args(command)
    runner = CliRunner()
    assert runner.invoke(main, [command, *TINY, *shard]).exit_code == 0
    assert calls[-1][0].is_access_logged is True
    assert calls[-1][1] == {"log_level": "info", "is_request_log_disabled": False}
    result = runner.invoke(main, [command, *TINY, *shard, "--log-level", "warning", "--disable-uvicorn-access-log",
                                  "--disable-log-requests"])
    assert result.exit_code == 0, result.output
    assert calls[-1][0].is_access_logged is False
    assert calls[-1][1] == {"log_level": "warning", "is_request_log_disabled": True}
    assert runner.invoke(main, [command, *TINY, *shard, "--disable-access-log"]).exit_code == 0
    assert calls[-1][0].is_access_logged is False and calls[-1][1]["log_level"] == "info"
    assert "--log-level" in refuse(command, *TINY, *shard, "--log-level", "chatty")
    for help_of in ("start-shard", command):  # one definition: the same choices and default
        assert "--log-level [debug|info|warning|error]" in runner.invoke(main, [help_of, "--help"]).output


@pytest.mark.parametrize("level", ["debug", "warning"])
def test_configure_logging_sets_the_root_level(level):
    """What serve, start-gpu and start-shard do with ``--log-level``, even where logging was set up before."""
    import logging

    from fastdecode.cli.log_options import configure_logging

    root = logging.getLogger()
    before = root.level
    try:
        configure_logging(level)
        assert root.level == getattr(logging, level.upper())
        assert logging.getLogger("fastdecode.frontend.access").getEffectiveLevel() == root.level
    finally:
        root.setLevel(before)


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_the_model_may_be_given_as_vllms_positional_argument(server_configs, command):
    """``vllm serve MODEL``: the same here, or --model; both at once only when they agree."""
    configs, shard = server_configs, shard_args(command)
    runner = CliRunner()
    rest = [*TINY[2:], *shard]  # TINY less its --model
    for args in (["random:tiny", *rest], [*TINY, *shard], ["random:tiny", "--model", "random:tiny", *rest]):
        result = runner.invoke(main, [command, *args])
        assert result.exit_code == 0, result.output
        assert configs[-1].cluster.model == "random:tiny" and configs[-1].frontend.served_model_name == "random:tiny"
    assert "give the model once" in refuse(command, "random:tiny", "--model", "smollm2", *rest)


def test_kv_memory_with_shard_daemons_is_refused_not_ignored():
    assert "start-shard --kv-memory" in refuse("serve", *TINY, "--shard", "tcp://127.0.0.1:5555", "--kv-memory", "1GiB")


def test_disable_log_requests_silences_only_the_request_lines(monkeypatch):
    import logging

    import fastdecode.actors.frontend as frontend
    import fastdecode.cli.serve as serve_module
    from fastdecode.actors.frontend.generation import REQUEST_LOGGER

    monkeypatch.setattr(frontend, "serve", lambda config, on_ready: None)
    monkeypatch.setattr("fastdecode.transport.event_loop.run_event_loop", lambda coro: None)
    request_logger, root = logging.getLogger(REQUEST_LOGGER), logging.getLogger()
    monkeypatch.setattr(request_logger, "level", request_logger.level)  # both restored after the test
    monkeypatch.setattr(root, "level", root.level)
    serve_module.run_server(SimpleNamespace(cluster=SimpleNamespace(model="m", seed=0)), log_level="info",
                            is_request_log_disabled=True)
    assert not request_logger.isEnabledFor(logging.INFO) and logging.getLogger("fastdecode.frontend").isEnabledFor(
        logging.INFO)


def test_vllms_dtype_names_half_and_float_are_taken(server_configs):
    for name, dtype in (("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16")):
        assert CliRunner().invoke(main, ["serve", "random:tiny", "--dtype", name]).exit_code == 0
        assert server_configs[-1].cluster.dtype == dtype


# ---- --chat-template, --served-model-name, --seed ----------------------------------------------------
BRACKETS_TEMPLATE = "{% for message in messages %}[{{ message.content }}]{% endfor %}"


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_chat_template_is_a_file_or_the_template_itself(server_configs, command, tmp_path):
    """vLLM's --chat-template: a file's text, or, when it cannot be opened and holds '{', '}' or a newline, the
    template itself."""
    configs, shard = server_configs, shard_args(command)
    runner = CliRunner()
    assert runner.invoke(main, [command, *TINY, *shard]).exit_code == 0
    assert configs[-1].cluster.chat_template is None  # the tokenizer's own
    path = tmp_path / "brackets.jinja"
    path.write_text(BRACKETS_TEMPLATE + "\n", encoding="utf-8")
    # inline, vLLM decodes escapes: a '\n' written in the shell is a newline in the template
    for given, template in ((str(path), BRACKETS_TEMPLATE + "\n"), (BRACKETS_TEMPLATE, BRACKETS_TEMPLATE),
                            (BRACKETS_TEMPLATE + "\\n", BRACKETS_TEMPLATE + "\n")):
        result = runner.invoke(main, [command, *TINY, *shard, "--chat-template", given])
        assert result.exit_code == 0, result.output
        assert configs[-1].cluster.chat_template == template


def test_a_chat_template_that_cannot_be_used_is_refused_before_the_model_loads(tmp_path):
    line = refuse("serve", *TINY, "--chat-template", str(tmp_path / "missing.jinja"))
    assert "--chat-template" in line and "missing.jinja" in line and "No such file" in line
    assert "does not parse" in refuse("serve", *TINY, "--chat-template", "{% for message in messages %}")
    assert "escapes do not decode" in refuse("serve", *TINY, "--chat-template", '{{ "C:\\users" }}')


def test_chat_template_reaches_the_served_tokenizer():
    """What /tokenize (and so a chat completion) renders is the --chat-template, not the model's."""
    with live_server.LiveServer(*live_server.TINY_ARGS, "--shards", "0", "--chat-template", BRACKETS_TEMPLATE) as server:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        request = urllib.request.Request(server.url + "/tokenize", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            tokens = json.loads(response.read())["tokens"]
    from fastdecode.actors.model import load_model

    _, tokenizer = load_model("random:tiny", dtype="float32", device="cpu")
    assert tokens == tokenizer.encode("[hi][yo]", add_special_tokens=False)


@pytest.mark.parametrize("command", ["serve", "start-gpu"])
def test_several_served_model_names_are_refused_naming_the_flag(server_configs, command):
    """vLLM's --served-model-name takes one or more names (aliases); this server answers to one. A second name
    used to become the positional MODEL ('unknown model b', or 'give the model once')."""
    configs, shard = server_configs, shard_args(command)
    rest = [*TINY[2:], *shard]  # TINY less its --model
    for args in ([*TINY, *shard, "--served-model-name", "a", "b"], ["random:tiny", *rest, "--served-model-name", "a", "b"],
                 ["--served-model-name", "a", "b", *rest]):
        line = refuse(command, *args)
        assert "--served-model-name" in line and "'a', 'b'" in line, line
    assert "'a', 'b', 'c'" in refuse(command, *TINY, *shard, "--served-model-name", "a", "b", "c", "--port", "0")
    result = CliRunner().invoke(main, [command, *TINY, *shard, "--served-model-name", "a"])
    assert result.exit_code == 0, result.output
    assert configs[-1].frontend.served_model_name == "a" and configs[-1].cluster.model == "random:tiny"
    result = CliRunner().invoke(main, [command, "random:tiny", "--served-model-name=a", *rest])
    assert result.exit_code == 0, result.output
    assert configs[-1].frontend.served_model_name == "a"
    # '--opt=a' is one value, as argparse (vLLM) reads it: the MODEL after it stays the MODEL
    result = CliRunner().invoke(main, [command, "--served-model-name=a", "random:tiny", *rest])
    assert result.exit_code == 0, result.output
    assert (configs[-1].frontend.served_model_name, configs[-1].cluster.model) == ("a", "random:tiny")
