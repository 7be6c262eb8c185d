"""Packaging: the sdist carries the native sources and no tests; the wheel's build carries the compiled library only
(no native/csrc, no setuptools warning about it); requires-python covers the newest stdlib the code uses."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TOP_LEVEL = ("actors", "transport", "native", "scheduler", "cli")
# stdlib names that need a newer Python than 3.10, and the version that brought them
NEWER_STDLIB = {r"asyncio\.Runner\b": (3, 11), r"asyncio\.timeout\(": (3, 11), r"\bTaskGroup\b": (3, 11),
                r"\bExceptionGroup\b": (3, 11), r"\bimport tomllib\b": (3, 11), r"typing import .*\bSelf\b": (3, 11),
                r"\bexcept\*": (3, 11), r"\bStrEnum\b": (3, 11)}


def package_sources() -> dict[str, str]:
    return {str(path.relative_to(ROOT)): path.read_text() for top in TOP_LEVEL for path in (ROOT / top).rglob("*.py")}


def test_requires_python_covers_the_stdlib_the_code_uses():
    bound = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", bound.strip())
    assert match, f"requires-python {bound!r} is not a plain lower bound"
    minimum = (int(match[1]), int(match[2]))
    needs = {(path, pattern): version for path, text in package_sources().items()
             for pattern, version in NEWER_STDLIB.items() if re.search(pattern, text)}
    assert needs, "the scan found none of the names: its patterns no longer match the code"  # asyncio.Runner today
    assert [key for key, version in needs.items() if version > minimum] == []


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The packaging inputs in a scratch folder, so that egg_info and build_py never write into the checkout."""
    copy = tmp_path_factory.mktemp("project")
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, copy / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o")
    for top in TOP_LEVEL:
        shutil.copytree(ROOT / top, copy / top, ignore=ignore)
    (copy / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_layout.py", copy / "tests" / "test_layout.py")  # sdists add tests/test*.py
    return copy


def run_setuptools(copy: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=copy, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_sdist_has_the_native_sources_and_no_tests(project_copy, tmp_path):
    run_setuptools(project_copy, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})")
    (sdist,) = tmp_path.glob("fastdecode-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "native" / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    assert sources and sources <= names
    assert {"setup.py", "pyproject.toml", "native/lib.py", "cli/main.py"} <= names
    assert [name for name in names if name.startswith("tests")] == []


def test_wheel_build_has_no_native_sources_and_no_warning(project_copy, tmp_path):
    lib = tmp_path / "lib"
    result = run_setuptools(project_copy, "setup.py", "build_py", "--build-lib", str(lib))
    native = lib / "fastdecode" / "native"
    assert (native / "lib.py").is_file()
    assert not (native / "csrc").exists()
    assert "absent from the `packages` configuration" not in result.stderr
