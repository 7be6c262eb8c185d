"""The Makefile's set-up: an interpreter older than 3.11 is refused with one line; a venv without pip (made before
python3-venv was installed) or of an older Python is made again; a working one is kept. Stand-in interpreters
answer for Python, so nothing is installed."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")

# A stand-in interpreter: fake.cfg beside it says whether it is older than 3.11 (old=1) and has pip (pip=1); it
# logs each call, answers the version check, makes a venv (a copy of itself, with pip) and "installs" anything.
FAKE_PYTHON = """#!/bin/sh
here=$(dirname "$0")
. "$here/fake.cfg"
echo "$0 $*" >> "$log"
if [ "$1" = -c ]; then
  case "$2" in *version_info*) exit "$old";; esac
  exit 0
fi
if [ "$1 $2" = "-m venv" ]; then
  for dir; do :; done
  rm -rf "$dir" && mkdir -p "$dir/bin" && cp "$0" "$dir/bin/python"
  printf 'old=%s\\npip=1\\nlog=%s\\n' "$old" "$log" > "$dir/bin/fake.cfg"
  exit 0
fi
if [ "$1 $2" = "-m pip" ]; then
  [ "$pip" = 1 ]
  exit $?
fi
exit 2
"""


def fake_python(folder: Path, log: Path, *, is_old: bool, has_pip: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    (folder / "fake.cfg").write_text(f"old={int(is_old)}\npip={int(has_pip)}\nlog={log}\n")
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    """The Makefile beside the files its stamp depends on."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    for name in ("pyproject.toml", "setup.py"):
        (folder / name).write_text("")
    return folder


def make(project: Path, python: Path, goal: str = "setup") -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={python}", goal], cwd=project,
                          capture_output=True, text=True, timeout=60)


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("goal", ["setup", "serve"])
def test_a_python_older_than_311_is_refused_with_one_line(project, tmp_path, goal):
    log = tmp_path / "calls.log"
    result = make(project, fake_python(tmp_path / "system", log, is_old=True), goal)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert said == [f"fastdecode needs Python 3.11 or newer and {tmp_path / 'system' / 'python'} is older or "
                    f"missing: run make PYTHON=python3.11 {goal}"]
    assert not (project / ".venv").exists()


@pytest.mark.parametrize("is_old, has_pip", [(False, False), (True, True)], ids=["without-pip", "older-python"])
def test_a_broken_or_older_venv_is_made_again(project, tmp_path, is_old, has_pip):
    log = tmp_path / "calls.log"
    fake_python(project / ".venv" / "bin", log, is_old=is_old, has_pip=has_pip)
    python = fake_python(tmp_path / "system", log, is_old=False)
    result = make(project, python)
    assert result.returncode == 0, result.stderr
    assert f"{python} -m venv --clear .venv" in calls(log)
    assert (project / ".venv" / ".fastdecode-installed").exists()
    assert any(call.endswith("-m pip install -q -e .[test]") for call in calls(log))


def test_a_working_venv_is_kept_and_an_up_to_date_stamp_does_nothing(project, tmp_path):
    log = tmp_path / "calls.log"
    fake_python(project / ".venv" / "bin", log, is_old=False)
    python = fake_python(tmp_path / "system", log, is_old=False)
    assert make(project, python).returncode == 0
    assert not [call for call in calls(log) if "-m venv" in call]
    assert any(call.endswith("-m pip install -q -e .[test]") for call in calls(log))
    log.unlink()
    assert make(project, python).returncode == 0
    assert calls(log) == []


def test_a_working_venv_needs_no_new_python_outside_it(project, tmp_path):
    """Made once with make PYTHON=python3.11 where python3 is 3.10: a later plain make (after a pull touched
    pyproject.toml) keeps the working venv instead of refusing the older system python."""
    log = tmp_path / "calls.log"
    fake_python(project / ".venv" / "bin", log, is_old=False)
    result = make(project, fake_python(tmp_path / "system", log, is_old=True))
    assert result.returncode == 0, result.stderr
    assert not [call for call in calls(log) if "-m venv" in call or "/system/" in call]
