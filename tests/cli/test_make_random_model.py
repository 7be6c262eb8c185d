"""``fdctl make-random-model``: an --out that cannot be created is one ``Error:`` line, before any weights."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fastdecode.actors.model import loader
from fastdecode.cli.main import main


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the weights are generated."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights generated before --out was checked")
    monkeypatch.setattr(loader, "random_model", refuse)


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_out_that_cannot_be_created_is_one_line_before_the_weights(tmp_path, no_weights, where):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file" / "model") if where == "under-a-file" else "/proc/fastdecode-no-such/model"
    result = CliRunner().invoke(main, ["make-random-model", "--preset", "tiny", "--out", out])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    reason = "Not a directory" if where == "under-a-file" else "No such file or directory"
    assert lines[0].startswith(f"Error: cannot create --out {out}: {reason}"), lines
    assert "Traceback" not in result.output


def test_an_unknown_preset_makes_no_folder(tmp_path, no_weights):
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["make-random-model", "--preset", "nope", "--out", str(out)])
    assert result.exit_code == 2 and "unknown random preset 'nope'" in result.stderr
    assert not out.exists()


def test_missing_parents_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "tiny"
    result = CliRunner().invoke(main, ["make-random-model", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
