"""Small helpers the steps share: dict arguments that arrive as dicts or as JSON text, and where a
``gs://`` artifact can be read from inside a pipeline step."""

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


def readable_path(uri: str) -> str:
    """Where this process can read ``uri``: inside Vertex Pipelines a bucket is mounted under
    ``/gcs/`` (Cloud Storage FUSE; ``GCS_FUSE_ROOT`` overrides the mount point), which is read like
    a local directory; without the mount the ``gs://`` URI itself (TensorFlow reads it)."""
    root = fuse_root()
    if uri.startswith("gs://") and os.path.isdir(root):
        return os.path.join(root, uri[len("gs://"):])
    return uri


def fuse_root() -> str:
    """Where Cloud Storage is mounted: ``/gcs`` in Vertex Pipelines, ``GCS_FUSE_ROOT`` if set."""
    return os.environ.get("GCS_FUSE_ROOT", "/gcs").rstrip("/") or "/gcs"
