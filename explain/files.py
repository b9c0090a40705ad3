"""Explain image files and write the lab's three-panel figures, whatever does the explaining.

``explain_files`` takes a callable from encoded images to Vertex-shaped explanations, so the same
figure writing serves the local engine (:func:`local_explainer`) and a remote endpoint (the
server's client passes a function that calls ``:explain`` over HTTP).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from explain.visualization import decode_jpeg_b64, save_explanation_figure
from trainer.pixels import eight_bit

#: encoded images -> one ``{"attributions": [...], "warnings": [...]}`` per image.
ExplainFn = Callable[[list[bytes]], list[Mapping[str, Any]]]


def local_explainer(model, parameters: Mapping[str, Any]) -> ExplainFn:
    """An :data:`ExplainFn` running :func:`explain.explain_images` on a loaded model."""
    from explain.explainer import explain_images

    return lambda image_bytes: explain_images(model, model.preprocess(image_bytes), parameters)


class FilesNotExplained(RuntimeError):
    """Some files could not be explained; every other one was, and ``explanations.json`` lists
    each failure with its file and reason. Raised after all the work, so one bad photo in a
    folder costs its own figure only."""

    def __init__(self, failures: list[tuple[str, str]], total: int) -> None:
        self.failures = failures
        listed = "; ".join(f"{path}: {reason}" for path, reason in failures[:10])
        more = f"; and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(f"{len(failures)} of {total} image file(s) could not be explained: {listed}{more}")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"cannot read image file: {error.strerror}") from None


#: How a refusal names the instance at fault: locally ``instance 3: ...``, from an endpoint ``instances[3]...``.
_NAMES_AN_INSTANCE = re.compile(r"\binstance \d+:|\binstances\[\d+\]")


def _explain_each(explain_fn: ExplainFn, paths: list[str], encoded: list[bytes]) -> list[Mapping[str, Any] | str]:
    """``explain_fn`` on the batch; if the batch is refused for an instance (a ``ValueError`` that
    names one), each file alone, so the bad ones are named and the rest explained. A refusal that
    is not about an instance (bad parameters, the endpoint down or overloaded) is raised: every file
    would meet it."""
    try:
        return list(explain_fn(encoded))
    except ValueError as error:
        if not _NAMES_AN_INSTANCE.search(str(error)):  # bad parameters: every file would meet it
            raise
        if len(encoded) == 1:
            return [re.sub(r"^instance 0: ", "", str(error))]
    return [_explain_each(explain_fn, [p], [e])[0] for p, e in zip(paths, encoded)]


def explain_files(image_files: Sequence[str], explain_fn: ExplainFn, output_dir: str,
                  batch_size: int = 8, suffix: str = "explanation") -> list[str]:
    """Explain ``image_files`` in batches through ``explain_fn``; write ``<stem>_<suffix>.png``
    (input, attribution mask, overlay) per file and ``explanations.json`` (scores, errors,
    warnings, no images; a file that failed has its ``error``) to ``output_dir``. Returns the
    figure paths, or raises :class:`FilesNotExplained` at the end if any file failed."""
    if not image_files:
        raise ValueError("no image files given")
    os.makedirs(output_dir, exist_ok=True)
    figures, summary, failed = [], [], []  # failed: (index, file, reason)
    with tqdm(total=len(image_files), desc="explaining", unit="image", disable=len(image_files) < 3) as progress:
        for lo in range(0, len(image_files), batch_size):
            read: list[tuple[int, str, bytes]] = []
            for index, path in enumerate(image_files[lo:lo + batch_size], lo):
                try:
                    read.append((index, path, _read(path)))
                except ValueError as error:
                    failed.append((index, path, str(error)))
            results = _explain_each(explain_fn, [p for _, p, _ in read], [d for _, _, d in read]) if read else []
            for (index, path, data), explanation in zip(read, results):
                try:
                    if isinstance(explanation, str):
                        raise ValueError(explanation)
                    figure, entry = _write(path, data, explanation, output_dir, suffix)
                except (ValueError, OSError) as error:
                    failed.append((index, path, str(error)))
                else:
                    figures.append(figure)
                    summary.append(entry)
            progress.update(len(image_files[lo:lo + batch_size]))
    failures = [(path, reason) for _, path, reason in sorted(failed)]  # in the order given
    summary += [{"file": path, "error": reason} for path, reason in failures]
    with open(os.path.join(output_dir, "explanations.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if failures:
        raise FilesNotExplained(failures, len(image_files))
    return figures


def _write(path: str, data: bytes, explanation: Mapping[str, Any], output_dir: str,
           suffix: str) -> tuple[str, dict[str, Any]]:
    """One file's three-panel figure and its ``explanations.json`` entry."""
    attribution = explanation["attributions"][0]
    feature = next(iter(attribution["featureAttributions"].values()))
    mask = decode_jpeg_b64(feature["b64_jpeg"])
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = np.asarray(eight_bit(opened).convert("RGB").resize(mask.shape[1::-1]))
    except (OSError, Image.DecompressionBombError) as error:  # the model read it; PIL cannot draw it
        raise ValueError(f"explained, but the figure cannot show this image: {error}") from None
    title = (f"{Path(path).name}: {attribution['outputDisplayName']} "
             f"({attribution['instanceOutputValue']:.2f}), "
             f"approximation error {attribution['approximationError']:.3f}")
    figure = save_explanation_figure(image, mask, os.path.join(output_dir, f"{Path(path).stem}_{suffix}.png"), title)
    return figure, {"file": path, "figure": figure, "warnings": list(explanation.get("warnings", [])),
                    "attributions": [{k: v for k, v in a.items() if k != "featureAttributions"}
                                     for a in explanation["attributions"]]}
