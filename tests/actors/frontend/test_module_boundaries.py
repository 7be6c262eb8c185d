"""The frontend's modules use one another only through public names (no ``_private`` import across files)."""
from __future__ import annotations

import ast
from pathlib import Path

import fastdecode.actors.frontend as frontend


def test_no_module_imports_a_private_name_of_another():
    folder = Path(frontend.__file__).parent
    private = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastdecode."):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert len(list(folder.glob("*.py"))) > 5  # the folder really was read
    assert private == []
