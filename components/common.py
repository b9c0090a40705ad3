"""Small helpers the steps share: JSON-or-dict arguments and writing a step's result."""

from __future__ import annotations

import json
import os
from typing import Any


def as_dict(value: dict | str | None) -> dict[str, Any]:
    """A dict argument given as a dict (Python, tests), JSON text (CLI, KFP) or nothing."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected a JSON object, got {value!r} ({exc})") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return parsed


def write_result(result: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Write a step's result as JSON (the record a person or the next step reads), return it."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result
