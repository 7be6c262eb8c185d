"""Sampling defaults from a HF folder's ``generation_config.json`` (vLLM's ``--generation-config auto``)."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from fastdecode.actors.frontend import FrontendConfig, FrontendState
from fastdecode.actors.frontend.errors import ApiError
from fastdecode.actors.frontend.openai_request import parse_chat, parse_completion, parse_stream_request
from fastdecode.actors.model import ModelError
from fastdecode.actors.model.config import SamplingDefaults
from fastdecode.actors.model.hf_dir import chosen_sampling_defaults, read_hf_config
from fastdecode.actors.model.presets import PRESETS

QWEN2_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.7,
                    "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def hf_folder(tmp_path, generation: dict):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf_dict()))
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_generation_config_sampling_values_are_read(tmp_path):
    config = read_hf_config(hf_folder(tmp_path, QWEN2_GENERATION))
    assert config.sampling_defaults == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert config.eos_token_ids == (2, 3)


def test_values_equal_to_transformers_defaults_are_not_defaults(tmp_path):
    """vLLM reads the generation config's diff against transformers' defaults: top_k 50 is no default there."""
    generation = {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "max_new_tokens": 64, "min_p": 0.05}
    defaults = read_hf_config(hf_folder(tmp_path, generation)).sampling_defaults
    assert defaults == SamplingDefaults(top_p=0.9, max_tokens=64, min_p=0.05)
    assert defaults.sampling_fields() == {"top_p": 0.9, "min_p": 0.05}
    assert parse_chat(CHAT).sampling_params(5, 100, defaults).min_p == 0.05  # applied, as vLLM applies it
    assert parse_chat({**CHAT, "min_p": 0.0}).sampling_params(5, 100, defaults).min_p == 0.0


def test_no_generation_config_no_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf_dict()))
    assert read_hf_config(tmp_path).sampling_defaults == SamplingDefaults()


@pytest.mark.parametrize("generation", [{"temperature": "hot"}, {"top_p": 0}, {"top_k": 2.5}, {"top_k": -5},
                                        {"repetition_penalty": -1}, {"max_new_tokens": 0}, {"min_p": 1.5}])
def test_bad_generation_config_values_are_refused_at_load(tmp_path, generation):
    with pytest.raises(ModelError, match="generation_config.json"):
        read_hf_config(hf_folder(tmp_path, generation))


def test_defaults_fill_only_what_a_request_leaves_out():
    defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    params = parse_chat(CHAT).sampling_params(5, 100, defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    params = parse_chat({**CHAT, "temperature": 0, "top_k": 5}).sampling_params(5, 100, defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.0, 0.8, 5, 1.05)
    params = parse_completion({"prompt": "x", "top_p": 1.0}).sampling_params(5, 100, defaults)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 1.0, 16)
    params = parse_stream_request({"prompt": "x"}).sampling_params(5, 100, defaults)
    assert (params.temperature, params.top_k) == (0.7, 20)


def test_max_new_tokens_caps_every_requests_output_within_the_context():
    """vLLM's --generation-config: max_new_tokens is a server-wide limit on the output of every request."""
    defaults = SamplingDefaults(max_tokens=30)
    assert parse_chat(CHAT).sampling_params(5, 100, defaults).max_tokens == 30
    assert parse_chat(CHAT).sampling_params(80, 100, defaults).max_tokens == 20  # only the room left
    assert parse_chat({**CHAT, "max_tokens": 50}).sampling_params(5, 100, defaults).max_tokens == 30
    assert parse_chat({**CHAT, "max_tokens": 12}).sampling_params(5, 100, defaults).max_tokens == 12
    assert parse_chat(CHAT).sampling_params(5, 100).max_tokens == 95
    # completions default to 16 tokens (vLLM's CompletionRequest), under the cap; an explicit null is the room left
    assert parse_completion({"prompt": "x"}).sampling_params(5, 100, defaults).max_tokens == 16
    assert parse_completion({"prompt": "x"}).sampling_params(5, 100, SamplingDefaults(max_tokens=8)).max_tokens == 8
    assert parse_completion({"prompt": "x", "max_tokens": None}).sampling_params(5, 100).max_tokens == 95
    assert parse_completion({"prompt": "x", "max_tokens": None}).sampling_params(5, 100, defaults).max_tokens == 30
    with pytest.raises(ApiError, match="max_tokens asks for 96"):  # past the context: refused before the cap
        parse_chat({**CHAT, "max_tokens": 96}).sampling_params(5, 100, defaults)


def test_attaching_the_engine_logs_the_defaults(caplog):
    state = FrontendState(FrontendConfig(served_model_name="m"))
    defaults = SamplingDefaults(temperature=0.7, top_k=20, min_p=0.05)
    llm = SimpleNamespace(tokenizer=None, model_config=SimpleNamespace(sampling_defaults=defaults))
    with caplog.at_level(logging.INFO, logger="fastdecode.frontend"):
        state.llm = llm
    messages = [record.getMessage() for record in caplog.records]
    assert any("overridden by the model's Hugging Face generation config" in m and "temperature=0.7" in m
               and "top_k=20" in m and "min_p=0.05" in m for m in messages), messages
    assert not any("not implement" in m for m in messages), messages
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastdecode.frontend"):
        state.llm = SimpleNamespace(tokenizer=None, model_config=SimpleNamespace(sampling_defaults=SamplingDefaults()))
    assert not caplog.records


def test_generation_config_picks_the_models_none_or_a_folders_defaults(tmp_path):
    """vLLM's --generation-config: auto (the model's; None here), vllm (none), or a folder's generation_config.json."""
    assert chosen_sampling_defaults("auto") is None
    assert chosen_sampling_defaults("vllm") == SamplingDefaults()
    folder = hf_folder(tmp_path, QWEN2_GENERATION)
    assert chosen_sampling_defaults(str(folder)) == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20,
                                                                      repetition_penalty=1.05)
    with pytest.raises(ModelError, match="no generation_config.json"):
        chosen_sampling_defaults(str(tmp_path / "nowhere"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ModelError, match="bad generation_config.json"):
        chosen_sampling_defaults(str(folder))


async def test_a_cluster_serves_with_the_generation_config_it_was_given(tmp_path):
    from fastdecode.actors.api import AsyncLLM
    from fastdecode.actors.cluster import ClusterConfig

    folder = hf_folder(tmp_path, {"temperature": 0.5, "min_p": 0.1})
    config = ClusterConfig(model="random:tiny", dtype="float32", device="cpu", num_shards=0,
                           generation_config=str(folder))
    async with await AsyncLLM.start(config) as llm:
        assert llm.model_config.sampling_defaults == SamplingDefaults(temperature=0.5, min_p=0.1)
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.min_p) == (0.5, 0.1)
    with pytest.raises(TypeError, match="generation_config"):
        ClusterConfig(model="random:tiny", generation_config=None)


def test_the_generation_config_option_reaches_the_cluster(monkeypatch):
    from click.testing import CliRunner

    import fastdecode.cli.serve as serve_module
    from fastdecode.cli.main import main

    configs = []
    monkeypatch.setattr(serve_module, "run_server", lambda config, **_: configs.append(config))
    assert CliRunner().invoke(main, ["serve", "random:tiny"]).exit_code == 0
    assert configs[-1].cluster.generation_config == "auto"
    assert CliRunner().invoke(main, ["serve", "random:tiny", "--generation-config", "vllm"]).exit_code == 0
    assert configs[-1].cluster.generation_config == "vllm"
