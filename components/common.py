"""Small helpers the steps share: dict arguments that arrive as dicts or as JSON text."""

from __future__ import annotations

import json
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
