"""Explain image files and write the lab's three-panel figures, whatever does the explaining.

``explain_files`` takes a callable from encoded images to Vertex-shaped explanations, so the same
figure writing serves the local engine (:func:`local_explainer`) and a remote endpoint (the
server's client passes a function that calls ``:explain`` over HTTP).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from explain.visualization import decode_jpeg_b64, save_explanation_figure

#: encoded images -> one ``{"attributions": [...], "warnings": [...]}`` per image.
ExplainFn = Callable[[list[bytes]], list[Mapping[str, Any]]]


def local_explainer(model, parameters: Mapping[str, Any]) -> ExplainFn:
    """An :data:`ExplainFn` running :func:`explain.explain_images` on a loaded model."""
    from explain.explainer import explain_images

    return lambda image_bytes: explain_images(model, model.preprocess(image_bytes), parameters)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"{path}: cannot read image file: {error.strerror}") from None


def explain_files(image_files: Sequence[str], explain_fn: ExplainFn, output_dir: str,
                  batch_size: int = 8, suffix: str = "explanation") -> list[str]:
    """Explain ``image_files`` in batches through ``explain_fn``; write ``<stem>_<suffix>.png``
    (input, attribution mask, overlay) per file and ``explanations.json`` (scores, errors,
    warnings, no images) to ``output_dir``. Returns the figure paths."""
    if not image_files:
        raise ValueError("no image files given")
    os.makedirs(output_dir, exist_ok=True)
    figures, summary = [], []
    with tqdm(total=len(image_files), desc="explaining", unit="image", disable=len(image_files) < 3) as progress:
        for lo in range(0, len(image_files), batch_size):
            paths = list(image_files[lo:lo + batch_size])
            encoded = [_read(p) for p in paths]
            for path, data, explanation in zip(paths, encoded, explain_fn(encoded)):
                attribution = explanation["attributions"][0]
                feature = next(iter(attribution["featureAttributions"].values()))
                mask = decode_jpeg_b64(feature["b64_jpeg"])
                image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(mask.shape[1::-1]))
                title = (f"{Path(path).name}: {attribution['outputDisplayName']} "
                         f"({attribution['instanceOutputValue']:.2f}), "
                         f"approximation error {attribution['approximationError']:.3f}")
                figure = os.path.join(output_dir, f"{Path(path).stem}_{suffix}.png")
                figures.append(save_explanation_figure(image, mask, figure, title))
                summary.append({"file": path, "figure": figure, "warnings": list(explanation.get("warnings", [])),
                                "attributions": [{k: v for k, v in a.items() if k != "featureAttributions"}
                                                 for a in explanation["attributions"]]})
                progress.update()
    with open(os.path.join(output_dir, "explanations.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return figures
