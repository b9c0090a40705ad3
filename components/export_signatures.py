"""Step 2, export_signatures: the trained model as a SavedModel with ``serving_default``,
``xai_preprocess`` and ``xai_model``, plus ``labels.txt`` and ``explanation_metadata.json`` read back
from the saved signatures. The upload step takes its explanation metadata from here, never by hand."""

from __future__ import annotations

import json
from typing import Any

import fire

from components.common import as_dict


def export_signatures(keras_model_dir: str, export_dir: str, visualization: dict | str | None = None) -> dict[str, Any]:
    """Export and return the explanation metadata (with the configured visualization)."""
    from trainer.export import export_keras_model

    return export_keras_model(keras_model_dir, export_dir, visualization=as_dict(visualization) or None)


if __name__ == "__main__":
    fire.Fire(export_signatures, serialize=lambda m: json.dumps(m, indent=2))
