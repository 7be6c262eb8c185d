"""Reading the JSON files of a model folder with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastdecode.actors.model.errors import ModelError


def read_json(path: Path, *, required: bool) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` if it is absent and not ``required``."""
    if not path.is_file():
        if required:
            raise ModelError(f"missing file {path}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"corrupt JSON file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"corrupt JSON file {path}: expected an object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
